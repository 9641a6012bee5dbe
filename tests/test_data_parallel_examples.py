"""examples/data_parallel: the demo's output says what it shows; throughput.py prints its rows."""

from __future__ import annotations

import contextlib
import io
import re

import pytest
import torch

from tests.multirank import run_on_ranks


def _demo(args: list[str]) -> str:
    from examples.data_parallel import demo

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        demo.main(args)
    return printed.getvalue()


def _vectors(out: str, label: str) -> dict[int, torch.Tensor]:
    found = re.findall(rf"^rank (\d+): {label}\s+\[([^\]]*)\]$", out, re.MULTILINE)
    return {int(rank): torch.tensor([float(v) for v in text.split(",")]) for rank, text in found}


def test_the_demo_on_two_ranks_shows_shares_order_and_synchronized_gradients() -> None:
    outputs = run_on_ranks(_demo, 2, ["--force-cpu", "--steps", "2"], timeout=120)
    assert outputs[1] == "", "only rank 0 prints"
    out = outputs[0]
    # (a) 33 items: contiguous shares of 17 and 16, every result once, in input order.
    for line in (
        "split: 17 + 16 (contiguous shares, sizes differ by <= 1)",
        "rank 0 processed items 0-16 (17 items)",
        "rank 1 processed items 17-32 (16 items)",
        "ordered result on rank 0: ids 0-32 (33 items), in input order: True",
        "equal to one process scoring every item: True",
    ):
        assert line in out, out
    # (b) the printed numbers bear the claims out: local gradients differ, the all-reduced
    # ones are their mean on both ranks.
    local, synced = _vectors(out, "local gradient"), _vectors(out, "after all-reduce")
    assert set(local) == set(synced) == {0, 1}, out
    assert not torch.allclose(local[0], local[1], atol=1e-3)
    assert torch.equal(synced[0], synced[1])
    torch.testing.assert_close(synced[0], (local[0] + local[1]) / 2, atol=2e-4, rtol=0)
    for line in (
        "local gradients differ between ranks: True",
        "gradients equal on every rank after the all-reduce: True",
        "and equal to the mean of the local gradients: True",
        "weights equal on every rank after optimizer.step(): True",
    ):
        assert line in out, out
    # (c) the transformer: continuations split and equal to one process; DDP training.
    for line in (
        "rank 0 continued prompts 0-5 (6 items)",
        "rank 1 continued prompts 6-11 (6 items)",
        "continuations equal to one process: True",
        "batch: 4 per device x 2 ranks = 8 samples per optimizer step",
        "ranks trained on different samples: True",
        "weights identical on every rank after 2 steps: True",
    ):
        assert line in out, out
    assert "False" not in out, out


def test_the_demo_in_one_process_says_how_to_launch_more() -> None:
    out = run_on_ranks(_demo, 1, ["--force-cpu", "--demos", "inference", "--items", "5"])[0]
    assert "rank 0 processed items 0-4 (5 items)" in out
    assert "launch with `dream-trainer run --nproc 2" in out


# The launcher's agent asks for a fault handler on stderr, which pytest's capture lacks.
@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
def test_throughput_smoke_prints_a_row_per_rank_count_with_ratios(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from examples.data_parallel import throughput

    throughput.main(["--smoke"])  # launches itself through torchrun on 1, then 2 CPU ranks
    out = capsys.readouterr().out
    rows = {
        cells[0]: cells
        for line in out.splitlines()
        if line.startswith("| ")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    header = rows.pop("ranks")
    column = {name: index for index, name in enumerate(header)}
    assert set(rows) == {"1", "2"}, out
    assert rows["1"][column["vs 1 rank"]] == "1.00"
    for cells in rows.values():
        assert float(cells[column["items/s"]]) > 0, cells
        assert float(cells[column["vs 1 rank"]]) > 0, cells
        assert float(cells[column["load"]]) >= 0, cells
    assert rows["2"][column["items per rank"]] == "8 + 8"
    assert "load average before:" in out and "load average after:" in out
