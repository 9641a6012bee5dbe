"""Smoke tests of the benchmarks: overhead.py runs and both of its loops do the same work;
pipeline.py runs its schedules on 2 ranks and prints a row for each; checkpoint.py prints every
row and leaves nothing behind; context_parallel.py measures cp 1 and 2 and their losses
match; inference.py generates on 1 and 2 ranks with the same completions.

No timing is asserted here; speed is measured by running the benchmark itself.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from benchmarks import checkpoint as checkpoint_bench
from benchmarks import context_parallel as cp_bench
from benchmarks import inference as inference_bench
from benchmarks import overhead, pipeline
from tests.multirank import run_on_ranks

TINY = overhead.Sizes(vocab=32, dim=16, layers=2, heads=2, seq=8, batch=2)
TINY_ARGS = ["--vocab", "32", "--dim", "16", "--layers", "2", "--heads", "2", "--seq", "8"]


def test_single_layout_prints_a_ratio_row(capsys: pytest.CaptureFixture[str]) -> None:
    overhead.main(
        ["--layout", "single", "--rounds", "2", "--warmup", "1", "--steps", "10", *TINY_ARGS]
    )
    out = capsys.readouterr().out
    row = re.search(r"^\| single \|\s+1 \|.*$", out, re.MULTILINE)
    assert row is not None, out
    cells = [c.strip() for c in row.group(0).strip("|").split("|")]
    trainer_ms, hand_ms, ratio, cpu_ratio = (float(c) for c in cells[2:6])
    assert trainer_ms > 0 and hand_ms > 0 and ratio > 0 and cpu_ratio > 0
    assert float(cells[7]) > 0  # the A/A control ran
    assert cells[8] == "2"  # one block of 10 steps per window
    assert re.search(
        r"^single \(1 thread/rank\): ratio [\d.]+ .* loss trajectories match", out, re.M
    )


def test_interleaved_loops_follow_the_same_loss_trajectory() -> None:
    window = overhead.trainer_vs_hand("single", TINY, warmup=1, steps=3, mesh=None)
    trainer_losses, hand_losses = window.losses
    assert len(trainer_losses) == len(hand_losses) == 5 * overhead.ACCUM
    # Weights change after every step, so equal losses on later micro-batches mean equal updates.
    assert trainer_losses == pytest.approx(hand_losses, rel=1e-5)
    assert trainer_losses[0] != pytest.approx(trainer_losses[-1], rel=1e-3)
    # Three timed steps per side, each a positive (wall, CPU) time.
    assert len(window.first) == len(window.second) == 3
    assert all(wall > 0 for wall, _ in window.first + window.second)


def test_control_times_two_identical_hand_loops() -> None:
    window = overhead.hand_vs_hand("single", TINY, warmup=1, steps=12, mesh=None)
    assert window.losses[0] == window.losses[1]
    assert len(window.first) == len(window.second) == 12
    assert len(overhead.blocks(window.first)) == 1  # 12 steps: one block of 10, 2 left over


def loss_gap_on_ranks(layout: str) -> float:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    result = overhead.measure(layout, TINY, rounds=1, warmup=1, steps=10, mesh=mesh, control=False)
    return result.loss_diff


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_two_rank_loops_follow_the_same_loss_trajectory(layout: str) -> None:
    gaps = run_on_ranks(loss_gap_on_ranks, 2, layout)
    assert max(gaps) < 1e-5, gaps


def table_rows(out: str) -> dict[str, list[str]]:
    """The markdown table's rows by their first cell."""
    rows = [
        line.strip().strip("|").split("|") for line in out.splitlines() if line.startswith("| ")
    ]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows}


@pytest.mark.multirank
def test_pipeline_smoke_prints_a_row_per_schedule(capsys: pytest.CaptureFixture[str]) -> None:
    pipeline.main(["--smoke"])  # 2 ranks, GPipe and Interleaved1F1B, tiny model, 3 timed steps
    out = capsys.readouterr().out
    rows = table_rows(out)
    header = rows.pop("schedule")
    column = {name: index for index, name in enumerate(header)}
    for label in ("no PP, whole batch (run 1)", "no PP, accumulated (run 1)"):
        assert float(rows[label][column["step ms"]]) > 0, out
    for schedule in pipeline.SMOKE_SCHEDULES:
        assert schedule in rows, out
        cells = rows[schedule]
        assert len(cells) == len(header), cells
        assert not cells[column["step ms"]].startswith("failed"), cells
        assert float(cells[column["step ms"]]) > 0, cells
        assert float(cells[column["PP/no-PP"]]) > 0, cells
        assert float(cells[column["compute ms"]]) > 0, cells
        mean, worst = float(cells[column["bubble mean"]]), float(cells[column["bubble max"]])
        assert 0 <= mean <= worst <= 1, cells
        assert 0 <= float(cells[column["in P2P"]]) <= 1, cells
        assert 0 <= float(cells[column["outside schedule"]]) <= 1, cells
        p, v, m = 2, int(cells[column["stages/rank"]]), int(cells[column["microbatches"]])
        theory = float(cells[column["theory"]].split()[0])  # zero-bubble rows add a remark
        assert theory == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-3)
    assert rows["GPipe"][column["stages/rank"]] == "1"
    assert rows["Interleaved1F1B"][column["stages/rank"]] == "2"
    assert "load average before:" in out and "load average after:" in out


def test_checkpoint_smoke_prints_every_row_and_cleans_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint_bench.main(["--smoke", "--dir", str(tmp_path)])  # 2 MB model, 1 round
    out = capsys.readouterr().out
    rows = table_rows(out)
    header = rows.pop("operation")
    column = {name: index for index, name in enumerate(header)}
    assert set(rows) == {label for label, _ in checkpoint_bench.ROWS}, out
    for label, key in checkpoint_bench.ROWS:
        cells = rows[label]
        assert len(cells) == len(header), cells
        assert float(cells[column["median s"]]) > 0 and float(cells[column["GB/s"]]) > 0, cells
        float(cells[column["load"]])
        if key != "disk" and not key.startswith("read"):  # compared with a disk row
            assert float(cells[column["/ disk"]]) > 0, cells
        if key in ("off", *checkpoint_bench.ASYNC_MODES):
            assert float(cells[column["blocked s"]]) > 0, cells
            assert float(cells[column["blocked/sync"]]) > 0, cells
    assert rows["save sync (async_mode=off)"][column["blocked/sync"]] == "1.000"
    for mode in checkpoint_bench.ASYNC_MODES:
        assert float(rows[f"save async {mode}"][column["step busy/idle"]]) > 0
        assert re.search(rf"^async {mode}: blocked/sync [\d.]+ \(target < 0.10: ", out, re.M)
    assert "first async process save (untimed" in out
    assert "load average before:" in out and "load average after:" in out
    assert list(tmp_path.iterdir()) == []  # checkpoints, disk file and run directory removed


def test_checkpoint_refuses_without_three_model_sizes_of_free_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(
        checkpoint_bench.shutil, "disk_usage", lambda path: usage._replace(free=2 * 10**9)
    )
    with pytest.raises(SystemExit, match=r"not enough free disk space .* needs 3\.\d\d GB"):
        checkpoint_bench.main(["--size-gb", "1", "--dir", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.multirank
def test_context_parallel_smoke_prints_rows_with_equal_losses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cp_bench.main(["--smoke"])  # tiny llama3, cp 1 and 2 (allgather), 1 + 2 steps
    out = capsys.readouterr().out
    rows = table_rows(out)
    header = rows.pop("run")
    column = {name: index for index, name in enumerate(header)}
    assert set(rows) == {"cp=1 (run 1)", "cp=2 allgather"}, out
    for cells in rows.values():
        assert len(cells) == len(header), cells
        assert not cells[column["step ms"]].startswith("failed"), cells
        assert float(cells[column["activations MiB/rank"]]) > 0, cells
        assert float(cells[column["max Δloss"]]) < 1e-5, cells
    cp2 = rows["cp=2 allgather"]
    assert cp2[column["tokens/rank"]] == "32" and cp2[column["ideal"]] == "0.500"
    # Saved bytes do not depend on timing: half the tokens save less than the whole sequence.
    assert 0 < float(cp2[column["act. / cp=1"]]) < 1, cp2
    gap = re.search(r"^losses: max \|loss - loss at cp=1\| over 3 steps .*: (\S+) ", out, re.M)
    assert gap is not None and float(gap.group(1)) < 1e-5, out
    assert "load average before" in out and "load average after" in out


@pytest.mark.multirank
def test_inference_smoke_prints_a_row_per_rank_count_with_the_same_output(
    capsys: pytest.CaptureFixture[str],
) -> None:
    inference_bench.main(["--smoke"])  # tiny llama3, 1 and 2 ranks, 8 prompts, 2 new tokens
    out = capsys.readouterr().out
    rows = table_rows(out)
    header = rows.pop("run")
    column = {name: index for index, name in enumerate(header)}
    assert set(rows) == {"1 rank (run 1)", "2 ranks"}, out
    for cells in rows.values():
        assert len(cells) == len(header), cells
        assert float(cells[column["prompts/s"]]) > 0, cells
        assert float(cells[column["/ 1 rank"]]) > 0, cells
        assert float(cells[column["new tokens/s"]]) > 0, cells
        assert cells[column["same output"]] == "true", cells  # the same work on 2 ranks
        float(cells[column["load"]])
    assert rows["1 rank (run 1)"][column["/ 1 rank"]] == "1.000"
    assert rows["2 ranks"][column["prompts/rank"]] == "4"  # 8 prompts split 4 + 4
    assert rows["2 ranks"][column["ideal"]] == "2"
    assert "load average before" in out and "load average after" in out
