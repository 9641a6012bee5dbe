"""examples/llama3/generate.py: continuations of a JSONL of prompts, split over replicas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dream_trainer.inference import JsonlResultFile
from tests.multirank import REPO_ROOT, run_on_ranks, run_torchrun

TINY = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32}
ARGS = ["--model_overrides", json.dumps(TINY), "--seq_len", "32", "--seed", "7"]


def _prompts(path: Path, n: int) -> None:
    lines = [
        json.dumps({"id": f"p{i:02d}", "prompt": f"def f_{i}(x):\n    return x"}) for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _generate_in_process(args: list[str]) -> tuple[int, int]:
    from examples.llama3.generate import main

    summary = main(args)
    return summary.written, summary.skipped


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("generate") / "prompts.jsonl"
    _prompts(path, 37)
    return path


def _args(prompts: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--prompts",
        str(prompts),
        "--output",
        str(output),
        "--max_new_tokens",
        "4",
        *ARGS,
        *extra,
    ]


def test_three_ranks_write_37_records_in_input_order_equal_to_one_process(
    prompts: Path, tmp_path: Path
) -> None:
    single, sharded = tmp_path / "single.jsonl", tmp_path / "sharded.jsonl"
    assert run_on_ranks(_generate_in_process, 1, _args(prompts, single, "--greedy"))[0] == (37, 0)
    script = str(REPO_ROOT / "examples/llama3/generate.py")
    # The debug preset is FSDP: 3 ranks shard the model and generate in lockstep.
    result = run_torchrun([script, *_args(prompts, sharded, "--greedy")], nproc=3, timeout=240)
    assert "assigned 13 items to replica 0 (rank 0)" in result.stderr + result.stdout
    records = JsonlResultFile(sharded).records()
    assert [r["id"] for r in records] == [f"p{i:02d}" for i in range(37)]
    assert records == JsonlResultFile(single).records()
    assert all(set(r) == {"id", "prompt", "completion"} and r["completion"] for r in records)


def test_sampling_is_seeded_per_prompt_and_resume_skips_written_ids(
    prompts: Path, tmp_path: Path
) -> None:
    first, resumed = tmp_path / "first.jsonl", tmp_path / "resumed.jsonl"
    assert run_on_ranks(_generate_in_process, 2, _args(prompts, first))[0] == (37, 0)
    # The same prompts, half already done: the rest is sampled alike on another split.
    lines = first.read_text(encoding="utf-8").splitlines()
    resumed.write_text("\n".join(lines[:20]) + "\n", encoding="utf-8")
    assert run_on_ranks(_generate_in_process, 1, _args(prompts, resumed, "--resume"))[0] == (17, 20)
    assert JsonlResultFile(resumed).records() == JsonlResultFile(first).records()


def test_a_prompt_record_without_a_prompt_names_the_line(tmp_path: Path) -> None:
    from examples.llama3.generate import read_prompts

    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1, "prompt": "a"}\n{"id": 2, "text": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no 'prompt' field"):
        read_prompts(path)
