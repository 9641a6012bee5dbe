#!/usr/bin/env bash
# On the GPU machine, from the repository root: install the prepared wheels into /tmp/site
# (no index needed), then run the llama3 throughput benchmark. Extra arguments go to the script.
#   bash benchmarks/gpu/run_llama_throughput.sh [--model 1B] [--checkpoint-activations] ...
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if compgen -G "benchmarks/gpu/wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site benchmarks/gpu/wheels/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu/llama_throughput.py "$@"
