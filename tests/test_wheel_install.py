"""Build the wheel, install it with core dependencies only into a fresh venv, import everything.

Catches source files left out of the wheel and optional dependencies imported at import time.
One test does it all in one venv because installing torch takes tens of seconds.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dream_trainer"
TORCH_SPEC = "torch==2.13.0"
OPTIONAL_DEPS = ("wandb", "torchmetrics", "torchao", "tensorboard", "tokenizers", "tiktoken")

# Copied source tree leaves out what is not part of a build (and stale build/ output that
# setuptools would otherwise reuse).
_IGNORE = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "site",
    ".venv",
    "venv",
    "runs",
    "wandb",
    "__pycache__",
    "*.pyc",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
)

IMPORT_EVERYTHING = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    import dream_trainer

    def onerror(name):
        raise ImportError(f"walk_packages could not import {name}")

    imported = ["dream_trainer"]
    for info in pkgutil.walk_packages(dream_trainer.__path__, "dream_trainer.", onerror=onerror):
        if any(part.startswith("_") for part in info.name.split(".")[1:]):
            continue
        importlib.import_module(info.name)
        imported.append(info.name)
    optional = sorted(
        name for name in sys.modules
        if name.split(".")[0] in OPTIONAL or name.startswith("torch.utils.tensorboard")
    )
    print(json.dumps({
        "file": dream_trainer.__file__,
        "prefix": sys.prefix,
        "base_prefix": sys.base_prefix,
        "imported": imported,
        "optional": optional,
    }))
    """
).replace("OPTIONAL", repr(OPTIONAL_DEPS))


def _env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONNOUSERSITE="1")
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> str:
    result = subprocess.run(
        cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"`{' '.join(cmd)}` exited {result.returncode}\n"
        f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
    )
    return result.stdout


def _can_build_without_isolation() -> bool:
    """setuptools >= 70.1 builds wheels by itself (no ``wheel`` package needed)."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    parts = [int(p) for p in version.split(".")[:2] if p.isdigit()]
    return len(parts) == 2 and tuple(parts) >= (70, 1)


def _pip_can_target_another_python() -> bool:
    """pip >= 22.3 has ``--python``: it can install into a venv that has no pip of its own."""
    try:
        version = importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        return False
    parts = [int(p) for p in version.split(".")[:2] if p.isdigit()]
    return len(parts) == 2 and tuple(parts) >= (22, 3)


def _source_files(tree: Path) -> set[str]:
    """Package files that the wheel must ship: every .py file and the py.typed marker."""
    root = tree / PACKAGE
    return {
        p.relative_to(tree).as_posix()
        for p in root.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and (p.suffix == ".py" or p.name == "py.typed")
    }


def _public_modules(files: set[str]) -> set[str]:
    names = set()
    for file in files:
        if not file.endswith(".py"):
            continue
        parts = file[: -len(".py")].split("/")
        if parts[-1] == "__init__":
            parts.pop()
        if not any(part.startswith("_") for part in parts[1:]):
            names.add(".".join(parts))
    return names


def test_wheel_installs_and_imports_with_core_deps_only(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(REPO_ROOT, src, ignore=_IGNORE)
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(src)]
    if _can_build_without_isolation():
        build.append("--no-build-isolation")  # saves ~8 s of setting up a build environment
    _run(build, tmp_path)
    wheels = sorted(dist.glob("dream_trainer-*.whl"))
    assert len(wheels) == 1, f"expected one dream_trainer wheel in {dist}, found {wheels}"
    wheel = wheels[0]

    source = _source_files(src)  # from the copy, so files added meanwhile cannot race the check
    with zipfile.ZipFile(wheel) as archive:
        packaged = {name for name in archive.namelist() if name.startswith(f"{PACKAGE}/")}
    missing = sorted(source - packaged)
    assert not missing, f"{wheel.name} lacks these source files: {missing}"

    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    # --no-compile: byte-compiling all of torch takes longer than the imports below.
    install = ["install", "--no-compile", str(wheel), TORCH_SPEC]
    if _pip_can_target_another_python():
        # No pip in the venv (setting it up costs ~5-14 s): this pip installs into it instead.
        _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
        _run([sys.executable, "-m", "pip", "--python", str(python), *install], tmp_path)
    else:
        _run([sys.executable, "-m", "venv", str(venv)], tmp_path)
        _run([str(python), "-m", "pip", *install], tmp_path)

    out = _run([str(python), "-c", IMPORT_EVERYTHING], tmp_path)
    report = json.loads(out.strip().splitlines()[-1])
    assert Path(report["prefix"]).resolve() == venv.resolve(), report["prefix"]
    assert report["prefix"] != report["base_prefix"], "the check must run inside the venv"
    installed = Path(report["file"]).resolve()
    assert installed.is_relative_to(venv.resolve()), (
        f"dream_trainer was imported from {installed}, not from the wheel installed in {venv}"
    )
    not_imported = sorted(_public_modules(source) - set(report["imported"]))
    assert not not_imported, (
        f"public modules not found in the installed package: {not_imported}. pkgutil only walks "
        "regular packages: does each directory on the way have an __init__.py?"
    )
    assert not report["optional"], (
        f"importing dream_trainer pulled in optional dependencies {report['optional']}; import "
        "them inside the functions that need them."
    )
