#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu scripts need on a GPU image that has torch but not
# pydantic, torchdata or torchao (the lent H200 image: Python 3.12, torch 2.11). Run here, where
# pip reaches the index; the wheels land in benchmarks/gpu/wheels (ignored by git, never
# committed) and travel with the working tree. Usage:
#   bash benchmarks/gpu/prepare_wheels.sh                # pydantic, torchdata, torchao
#   bash benchmarks/gpu/prepare_wheels.sh --torchtitan   # and torchtitan 0.3.0
# TORCHAO_VERSION picks the torchao release built against the image's torch (default below,
# for torch 2.11); PYTHON_VERSION the image's Python (default 3.12).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
out=wheels
mkdir -p "$out"
py=${PYTHON_VERSION:-3.12}
platforms=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
platform_args=()
for p in "${platforms[@]}"; do platform_args+=(--platform "$p"); done

fetch() {
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" \
        --implementation cp "${platform_args[@]}" -d "$out" "$@"
}

fetch "pydantic>=2.5,<3" "pydantic-core" "annotated-types" "typing-inspection"
fetch "torchdata==0.11.0" "torchao==${TORCHAO_VERSION:-0.16.0}"
if [[ "${1:-}" == "--torchtitan" ]]; then
    fetch "torchtitan==0.3.0" "tyro" "docstring-parser" "shtab" "tomli" "fsspec" "blobfile"
fi
echo "wheels in $(pwd)/$out:"
ls -1 "$out"
