"""Check the import layering of dream_trainer and examples by parsing their source.

Layers, lowest first: configs -> world -> parallel -> inference -> trainer -> callbacks ->
launch -> examples.
A module imports dream_trainer modules of its own layer or below only. Files directly in
dream_trainer/ (``__init__.py`` and other top-level modules) are the facade: they may import
anything in dream_trainer, and no layered module may import them (examples may: they are users).

Core modules must also not import optional heavy dependencies at import time (only inside
functions or under ``if TYPE_CHECKING:``), so ``import dream_trainer`` works with core deps only.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = REPO_ROOT / "dream_trainer"
EXAMPLES_DIR = REPO_ROOT / "examples"

# Subpackage of dream_trainer -> layer. A new subpackage must be added here.
LAYERS: dict[str, int] = {
    "configs": 0,
    "world": 1,
    "parallel": 2,
    "inference": 3,
    "trainer": 4,
    "callbacks": 5,
    "launch": 6,
}
EXAMPLES_LAYER = 7
FACADE_LAYER = 100
LAYER_NAMES = {**{v: k for k, v in LAYERS.items()}, EXAMPLES_LAYER: "examples"}

# Optional dependencies that dream_trainer may import only lazily.
OPTIONAL_DEPS = ("wandb", "torchmetrics", "torchao", "tensorboard", "tokenizers", "tiktoken")
OPTIONAL_DEP_PREFIXES = ("torch.utils.tensorboard",)


@dataclass(frozen=True)
class Import:
    line: int
    module: str  # absolute dotted name of the imported module or package
    names: tuple[str, ...]  # names taken from it by ``from module import ...``
    text: str
    top_level: bool  # runs when the importing module is imported


def source_files() -> list[Path]:
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    if EXAMPLES_DIR.is_dir():
        files += sorted(EXAMPLES_DIR.rglob("*.py"))
    return files


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(
    nodes: list[ast.stmt], top_level: bool
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Yield (import node, runs-at-import-time) for every import statement."""
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, top_level
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield from _walk(node.body, False)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _walk(node.body, False)
            yield from _walk(node.orelse, top_level)
        else:  # statements with nested bodies: class, if, for, while, with, try, match
            for attr in ("body", "orelse", "finalbody"):
                yield from _walk(getattr(node, attr, []), top_level)
            for handler in getattr(node, "handlers", []):
                yield from _walk(handler.body, top_level)
            for case in getattr(node, "cases", []):
                yield from _walk(case.body, top_level)


def imports_of(path: Path, source: str | None = None) -> list[Import]:
    """Every import statement of ``path`` (parsed from ``source`` when given)."""
    if source is None:
        source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    package = (
        module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    )
    found: list[Import] = []
    for node, top_level in _walk(tree.body, True):
        text = ast.unparse(node)  # the whole statement, even when it spans several lines
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(node.lineno, alias.name, (), text, top_level))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            names = tuple(alias.name for alias in node.names)
            found.append(Import(node.lineno, module, names, text, top_level))
    return found


def layer_of_path(path: Path) -> int:
    rel = path.relative_to(REPO_ROOT).parts
    if rel[0] == "examples":
        return EXAMPLES_LAYER
    if len(rel) == 2:  # dream_trainer/<file>.py
        return FACADE_LAYER
    if rel[1] not in LAYERS:
        raise AssertionError(
            f"{path.relative_to(REPO_ROOT)}: subpackage dream_trainer/{rel[1]} has no layer; "
            "add it to LAYERS in tests/test_layers.py (and the layer list in the docs)."
        )
    return LAYERS[rel[1]]


def layers_imported(imp: Import) -> list[tuple[int, str]]:
    """(layer, dotted name) of each dream_trainer module the import pulls in."""
    parts = imp.module.split(".")
    if parts[0] != "dream_trainer":
        return []
    if len(parts) > 1:
        targets = [parts[1]]
    else:  # ``import dream_trainer`` or ``from dream_trainer import x, y``
        targets = list(imp.names) or [""]
    result = []
    for target in targets:
        dotted = "dream_trainer" + (f".{target}" if target else "")
        result.append((LAYERS.get(target, FACADE_LAYER), dotted))
    return result


FILES = source_files()
IDS = [p.relative_to(REPO_ROOT).as_posix() for p in FILES]


def layer_problems(path: Path, source: str | None = None) -> list[str]:
    """One message per import of ``path`` that reaches above its layer."""
    own = layer_of_path(path)
    if own == FACADE_LAYER:
        return []
    rel = path.relative_to(REPO_ROOT).as_posix()
    own_name = LAYER_NAMES[own]
    problems = []
    for imp in imports_of(path, source):
        for layer, dotted in layers_imported(imp):
            if layer > own and not (layer == FACADE_LAYER and own == EXAMPLES_LAYER):
                above = "the dream_trainer facade" if layer == FACADE_LAYER else LAYER_NAMES[layer]
                problems.append(
                    f"{rel}:{imp.line}: `{imp.text}` imports {dotted} ({above}), but a module "
                    f"in layer '{own_name}' may only import from its own layer or below "
                    f"({' -> '.join(LAYER_NAMES[i] for i in range(own + 1))})."
                )
    return problems


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_imports_respect_layers(path: Path) -> None:
    problems = layer_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "path",
    [p for p in FILES if p.is_relative_to(PACKAGE_DIR)],
    ids=[i for i, p in zip(IDS, FILES) if p.is_relative_to(PACKAGE_DIR)],
)
def test_no_optional_dependency_at_import_time(path: Path) -> None:
    rel = path.relative_to(REPO_ROOT).as_posix()
    problems = []
    for imp in imports_of(path):
        root = imp.module.split(".")[0]
        optional = root in OPTIONAL_DEPS or imp.module.startswith(OPTIONAL_DEP_PREFIXES)
        if imp.module == "torch.utils" and "tensorboard" in imp.names:
            optional = True
        if optional and imp.top_level:
            problems.append(
                f"{rel}:{imp.line}: `{imp.text}` imports the optional dependency "
                f"{imp.module} at import time; import it inside the function that needs it "
                "(or under `if TYPE_CHECKING:`) so dream_trainer imports with core deps only."
            )
    assert not problems, "\n".join(problems)


def test_checker_sees_relative_and_lazy_imports() -> None:
    """The parser resolves relative imports and tells import-time from lazy imports."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from ..parallel import styles\n"
        "from .. import trainer, configs\n"
        "from . import layout\n"
        "try:\n    import wandb\nexcept ImportError:\n    wandb = None\n"
        "if TYPE_CHECKING:\n    import torchao\n"
        "def f():\n    import tiktoken\n"
    )
    # Parsed as if it lived at dream_trainer/world/probe.py; nothing is written there.
    imps = imports_of(PACKAGE_DIR / "world" / "probe.py", source)
    by_line = {i.line: i for i in imps}
    assert by_line[2].module == "dream_trainer.parallel"
    assert layers_imported(by_line[3]) == [
        (LAYERS["trainer"], "dream_trainer.trainer"),
        (LAYERS["configs"], "dream_trainer.configs"),
    ]
    assert by_line[4].module == "dream_trainer.world"
    assert by_line[6].module == "wandb" and by_line[6].top_level
    assert by_line[10].module == "torchao" and not by_line[10].top_level
    assert by_line[12].module == "tiktoken" and not by_line[12].top_level
    assert by_line[3].text == "from .. import trainer, configs"


def test_layer_messages_name_file_line_and_import() -> None:
    source = (
        "import torch\n\nfrom dream_trainer.trainer import Trainer\nfrom ..world import layout\n"
    )
    problems = layer_problems(PACKAGE_DIR / "configs" / "probe.py", source)
    assert problems == [
        "dream_trainer/configs/probe.py:3: `from dream_trainer.trainer import Trainer` imports "
        "dream_trainer.trainer (trainer), but a module in layer 'configs' may only import from "
        "its own layer or below (configs).",
        "dream_trainer/configs/probe.py:4: `from ..world import layout` imports "
        "dream_trainer.world (world), but a module in layer 'configs' may only import from "
        "its own layer or below (configs).",
    ]
    assert layer_problems(EXAMPLES_DIR / "probe.py", "import dream_trainer\n") == []
    assert layer_problems(PACKAGE_DIR / "callbacks" / "probe.py", "import dream_trainer\n")
    assert layer_problems(PACKAGE_DIR / "probe.py", "from .callbacks import x\n") == []
