"""Run every ```python block of the docs and README; check the docs site and README structure.

Conventions are described in tests/docs_snippets.py and docs/contributing.md.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import traceback
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.docs_snippets import (
    DOCS_DIR,
    README,
    REPO_ROOT,
    Block,
    SnippetSyntaxError,
    all_python_blocks,
    exec_snippet,
    parse_markdown,
    readme_command,
    run_source,
)


def _collect() -> tuple[list[Block], str | None]:
    try:
        return list(all_python_blocks()), None
    except SnippetSyntaxError as err:
        return [], str(err)


BLOCKS, COLLECT_ERROR = _collect()


@dataclass
class _PageState:
    """Shared namespace and working directory of one page; blocks run in page order."""

    workdir: Path
    namespace: dict[str, Any] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    failed: str | None = None


class _StateFactory(dict[str, _PageState]):
    """Creates each page's state on first use: a temp dir and a module registered as a namespace."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self._factory = factory

    def __missing__(self, page: str) -> _PageState:
        slug = re.sub(r"\W", "_", page)
        # A real module in sys.modules lets dataclasses/pydantic resolve snippet annotations.
        module = types.ModuleType(f"docs_snippet_{slug}")
        sys.modules[module.__name__] = module
        state = _PageState(self._factory.mktemp(slug), module.__dict__)
        self[page] = state
        return state

    def close(self) -> None:
        for state in self.values():
            sys.modules.pop(state.namespace["__name__"], None)


@pytest.fixture(scope="module")
def page_states(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_StateFactory]:
    states = _StateFactory(tmp_path_factory)
    yield states
    states.close()


def _run_single_rank(block: Block, state: _PageState) -> None:
    old = os.getcwd()
    os.chdir(state.workdir)
    try:
        run_source(block.source, str(block.path), state.namespace, block.line)
    finally:
        os.chdir(old)


def test_docs_pages_follow_snippet_conventions() -> None:
    assert COLLECT_ERROR is None, COLLECT_ERROR


def test_pages_in_subfolders_of_docs_are_collected() -> None:
    pages = {block.page for block in BLOCKS}
    assert "docs/tutorials/multi-gpu.md" in pages, sorted(pages)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.test_id for b in BLOCKS])
def test_snippet(block: Block, page_states: _StateFactory) -> None:
    if block.skip_reason is not None:
        pytest.skip(f"{block.test_id}: {block.skip_reason}")
    state = page_states[block.page]
    # Earlier single-rank blocks of the page define names later ones use: run any not run yet
    # (e.g. when this test was selected alone with -k).
    for earlier in BLOCKS:
        if earlier is block:
            break
        if earlier.page != block.page or earlier.test_id in state.done:
            continue
        if earlier.skip_reason is not None or earlier.ranks > 1:
            continue
        if state.failed is None:
            try:
                _run_single_rank(earlier, state)
            except BaseException:
                state.failed = earlier.test_id
                raise
            state.done.add(earlier.test_id)
    if state.failed is not None:
        pytest.fail(
            f"{block.test_id} not run: the earlier block {state.failed} of its page failed.",
            pytrace=False,
        )
    try:
        if block.ranks > 1:
            from tests.multirank import run_on_ranks

            run_on_ranks(
                exec_snippet,
                block.ranks,
                block.source,
                str(block.path),
                cwd=str(state.workdir),
                line=block.line,
            )
        else:
            _run_single_rank(block, state)
    except BaseException:
        state.failed = block.test_id
        raise
    state.done.add(block.test_id)


def test_parser_conventions(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    text = "\n".join(
        [
            "# Title",
            "<!-- skip: needs a GPU -->",
            "",
            "```python",
            "x = 1",
            "```",
            "Some text.",
            "<!-- ranks: 2 -->",
            "```python",
            "y = 2",
            "```",
            "<!-- ranks: 2 -->",
            "Text between the directive and the block cancels the directive.",
            "````markdown",
            "```python",
            "not a block of its own",
            "```",
            "````",
            "```bash",
            "echo hi",
            "```",
        ]
    )
    blocks = parse_markdown(text, page)
    assert [(b.lang, b.line) for b in blocks] == [
        ("python", 5),
        ("python", 10),
        ("markdown", 15),
        ("bash", 20),
    ]
    assert blocks[0].skip_reason == "needs a GPU" and blocks[0].ranks == 1
    assert blocks[1].skip_reason is None and blocks[1].ranks == 2
    assert blocks[2].directives == {} and "not a block of its own" in blocks[2].source
    with pytest.raises(SnippetSyntaxError, match="needs a reason"):
        parse_markdown("<!-- skip: -->\n```python\npass\n```\n", page)
    with pytest.raises(SnippetSyntaxError, match="positive whole number"):
        parse_markdown("<!-- ranks: two -->\n```python\npass\n```\n", page)
    with pytest.raises(SnippetSyntaxError, match="never closed"):
        parse_markdown("```python\npass\n", page)


def test_snippet_tracebacks_point_into_the_page(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError) as info:
        exec_snippet("a = 1\nb = a / 0\n", "docs/example.md", cwd=str(tmp_path), line=41)
    frames = traceback.extract_tb(info.value.__traceback__)
    assert ("docs/example.md", 42) in [(f.filename, f.lineno) for f in frames]


def test_readme_setup_commands() -> None:
    main_job = readme_command("Run the main job")
    tests = readme_command("Run the tests")
    for command in (main_job, tests):
        steps = command.split(" && ")
        assert len(steps) == 4, (
            f"README command {command!r} must read 'venv && activate && install && run'."
        )
        assert steps[0] == "python3 -m venv .venv" and steps[1] == ". .venv/bin/activate", command
        assert shlex.split(steps[2])[:4] == ["python", "-m", "pip", "install"], command
        assert "torch==2.13.0" in shlex.split(steps[2]), command
    assert "-e" in shlex.split(main_job) and ".[llama]" in shlex.split(main_job)
    assert "torchrun" in main_job and "examples/llama3/train.py" in main_job
    assert (REPO_ROOT / "examples" / "llama3").is_dir()
    assert ".[dev]" in shlex.split(tests) and tests.endswith("python -m pytest")


def test_readme_relative_links_exist() -> None:
    text = README.read_text(encoding="utf-8")
    missing = [
        target
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
        if "://" not in target and not (REPO_ROOT / target).exists()
    ]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def _nav_files(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node] if node.endswith(".md") else []
    if isinstance(node, dict):
        return [f for value in node.values() for f in _nav_files(value)]
    if isinstance(node, list):
        return [f for item in node for f in _nav_files(item)]
    return []


def test_mkdocs_nav_lists_every_page() -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((REPO_ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = _nav_files(config.get("nav"))
    pages = sorted(p.relative_to(DOCS_DIR).as_posix() for p in DOCS_DIR.rglob("*.md"))
    unlisted = sorted(set(pages) - set(nav))
    dangling = sorted(set(nav) - set(pages))
    assert not unlisted, f"docs pages missing from the mkdocs.yml nav: {unlisted}"
    assert not dangling, f"mkdocs.yml nav entries with no file under docs/: {dangling}"
    assert len(nav) == len(set(nav)), f"mkdocs.yml nav lists a page twice: {nav}"


def test_ci_script_is_valid_bash() -> None:
    script = REPO_ROOT / ".ci" / "run"
    assert os.access(script, os.X_OK), ".ci/run must be executable (git update-index --chmod=+x)."
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
