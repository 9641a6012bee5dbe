"""Extract and run the code in the docs, and the set-up commands in README.md.

Conventions for fenced ```python blocks in docs/*.md and README.md (see docs/contributing.md):

* Every block runs, in page order, in one namespace per page, in a temporary working directory.
* ``<!-- skip: reason -->`` on the lines just before a block skips it; the reason is required.
* ``<!-- ranks: N -->`` runs the block on N CPU ranks through ``tests.multirank.run_on_ranks``.
  Such a block gets a fresh namespace on every rank: it must be self-contained.

This module uses only the standard library at import time so that ``.ci/run`` can call it as a
script before anything is installed::

    python3 tests/docs_snippets.py --readme-command "Run the tests"
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS_DIR = REPO_ROOT / "docs"
README = REPO_ROOT / "README.md"

_FENCE_RE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")
_DIRECTIVE_RE = re.compile(r"^<!--\s*(?P<key>[a-zA-Z_-]+)\s*:(?P<value>.*?)-->\s*$")
_KNOWN_DIRECTIVES = ("skip", "ranks")


class SnippetSyntaxError(ValueError):
    """A docs page breaks the snippet conventions (bad directive, unclosed fence)."""


@dataclass
class Block:
    """One fenced code block of a markdown page."""

    path: Path
    line: int  # 1-based line number of the first code line
    lang: str
    source: str
    directives: dict[str, str] = field(default_factory=dict)

    @property
    def page(self) -> str:
        return page_name(self.path)

    @property
    def test_id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        return self.directives.get("skip")

    @property
    def ranks(self) -> int:
        return int(self.directives.get("ranks", "1"))


def page_name(path: Path) -> str:
    """Name of a page relative to the repo root, e.g. ``docs/index.md`` or ``README.md``."""
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.name


def _parse_directive(path: Path, lineno: int, text: str) -> tuple[str, str] | None:
    match = _DIRECTIVE_RE.match(text.strip())
    if match is None:
        return None
    key, value = match["key"].lower(), match["value"].strip()
    where = f"{page_name(path)}:{lineno}"
    if key not in _KNOWN_DIRECTIVES:
        # Other HTML comments (e.g. list markers for the lead) are not directives.
        return None
    if key == "skip" and not value:
        raise SnippetSyntaxError(
            f"{where}: '<!-- skip: -->' needs a reason, e.g. '<!-- skip: needs a GPU -->'."
        )
    if key == "ranks" and (not value.isdigit() or int(value) < 1):
        raise SnippetSyntaxError(
            f"{where}: '<!-- ranks: {value} -->' must give a positive whole number of ranks, "
            "e.g. '<!-- ranks: 2 -->'."
        )
    return key, value


def parse_markdown(text: str, path: Path) -> list[Block]:
    """All fenced code blocks of ``text`` with the directives written just before each."""
    lines = text.splitlines()
    blocks: list[Block] = []
    pending: dict[str, str] = {}
    i = 0
    while i < len(lines):
        raw = lines[i]
        fence = _FENCE_RE.match(raw)
        if fence is None:
            directive = _parse_directive(path, i + 1, raw)
            if directive is not None:
                pending[directive[0]] = directive[1]
            elif raw.strip():
                # Directives apply only to the block right after them (blank lines allowed).
                pending = {}
            i += 1
            continue
        marker = fence["fence"]
        lang = fence["info"].strip().split(" ")[0].lower() if fence["info"].strip() else ""
        indent = len(fence["indent"])
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped.startswith(marker[0] * len(marker)) and set(stripped) == {marker[0]}:
                break
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        else:
            raise SnippetSyntaxError(
                f"{page_name(path)}:{i + 1}: code fence {marker!r} is never closed."
            )
        blocks.append(Block(path, i + 2, lang, "\n".join(body) + "\n", pending))
        pending = {}
        i = j + 1
    return blocks


def python_blocks(path: Path) -> list[Block]:
    """The ```python (or ```py) blocks of one page."""
    blocks = parse_markdown(path.read_text(encoding="utf-8"), path)
    return [b for b in blocks if b.lang in ("python", "py", "python3")]


def doc_pages() -> list[Path]:
    """Every page whose python blocks are run: docs/**/*.md and README.md."""
    pages = sorted(DOCS_DIR.rglob("*.md")) if DOCS_DIR.is_dir() else []
    return [README, *pages] if README.is_file() else pages


def all_python_blocks() -> Iterator[Block]:
    for page in doc_pages():
        yield from python_blocks(page)


def readme_command(heading: str, readme: Path = README) -> str:
    """The single command in the ```bash block right after the heading ``heading``.

    Raises ``SnippetSyntaxError`` naming what is missing, so CI fails loudly.
    """
    if not readme.is_file():
        raise SnippetSyntaxError(f"{readme} does not exist; it must hold the set-up commands.")
    text = readme.read_text(encoding="utf-8")
    lines = text.splitlines()
    heading_re = re.compile(r"^#{1,6}\s+" + re.escape(heading) + r"\s*$")
    starts = [n for n, line in enumerate(lines) if heading_re.match(line)]
    if len(starts) != 1:
        raise SnippetSyntaxError(
            f"{readme.name} must have exactly one heading '{heading}' (found {len(starts)})."
        )
    start = starts[0]
    end = next(
        (n for n in range(start + 1, len(lines)) if re.match(r"^#{1,6}\s", lines[n])), len(lines)
    )
    section = "\n".join(lines[start + 1 : end])
    bash = [b for b in parse_markdown(section, readme) if b.lang in ("bash", "sh", "shell")]
    if len(bash) != 1:
        raise SnippetSyntaxError(
            f"{readme.name}: the section '{heading}' must hold exactly one ```bash block "
            f"(found {len(bash)})."
        )
    commands = [c for c in bash[0].source.splitlines() if c.strip() and not c.startswith("#")]
    if len(commands) != 1:
        raise SnippetSyntaxError(
            f"{readme.name}: the ```bash block under '{heading}' must hold one command line "
            f"(found {len(commands)} lines)."
        )
    return commands[0].strip()


def exec_snippet(source: str, filename: str, cwd: str | None = None, line: int = 1) -> None:
    """Run one snippet in a fresh namespace (used on every rank for multi-rank blocks).

    ``line`` shifts line numbers so tracebacks point into the markdown page ``filename``.
    """
    old_cwd = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        module = _snippet_module(f"docs_snippet_{abs(hash(filename))}")
        try:
            run_source(source, filename, module.__dict__, line)
        finally:
            sys.modules.pop(module.__name__, None)
    finally:
        os.chdir(old_cwd)


def _snippet_module(name: str) -> types.ModuleType:
    # A real module in sys.modules lets dataclasses/pydantic resolve annotations of snippet classes.
    module = types.ModuleType(name)
    sys.modules[name] = module
    return module


def run_source(source: str, filename: str, namespace: dict[str, Any], line: int = 1) -> None:
    code = compile("\n" * (line - 1) + source, filename, "exec")
    exec(code, namespace)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--readme-command", metavar="HEADING", required=True)
    args = parser.parse_args(argv)
    try:
        print(readme_command(args.readme_command))
    except SnippetSyntaxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
