"""The arithmetic of the performance metrics, against hand-computed values (no ranks needed)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from dream_trainer.trainer import flops
from dream_trainer.trainer.device_memory import MemoryPeaks, memory_metrics
from dream_trainer.trainer.flops import (
    declared_flops_per_token,
    flops_metrics,
    peak_flops_for,
    peak_flops_for_name,
)
from dream_trainer.trainer.rank_balance import BalanceWarnings, balance_metrics, diagnose
from dream_trainer.trainer.throughput import RankWindow, StepClock, throughput_metrics


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def window(**fields: Any) -> RankWindow:
    values: dict[str, Any] = dict(
        steps=4, step_s=2.0, data_s=0.0, barrier_s=0.0, samples=32, tokens=None
    )
    values.update(fields)
    return RankWindow(**values)


def test_step_clock_times_steps_data_and_the_barrier():
    clock = FakeClock()
    timer = StepClock(clock)

    def loader():  # each next() costs 0.25 s on the fake clock
        for i in range(4):
            clock.t += 0.25
            yield i, {"x": torch.zeros(8, 3)}

    batches = timer.timed(loader(), tokens_in_batch=lambda b: b["x"].numel())
    for index, _ in batches:  # 2 micro-batches per step, 1 s of compute each
        clock.t += 1.0
        if index % 2:
            timer.step_done()
            clock.t += 5.0  # validation / checkpoint between steps: in no step
    timer.arrive()
    clock.t += 0.5  # waiting in the all-reduce
    got = timer.take()
    assert got == RankWindow(steps=2, step_s=5.0, data_s=1.0, barrier_s=0.5, samples=32, tokens=96)
    assert got.train_s == 5.5
    assert got.busy_fraction == pytest.approx((5.0 - 1.0) / 5.5)
    # The next window starts empty; the StopIteration of the epoch's end is no data wait.
    assert timer.take() == RankWindow(0, 0.0, 0.0, 0.0, 0, 0.0)


def test_step_clock_reports_no_tokens_unless_every_batch_has_a_count_and_sums_tensors():
    timer = StepClock(FakeClock())
    counts = iter([3, None])
    for _ in timer.timed([(0, torch.zeros(2)), (1, torch.zeros(2))], lambda b: next(counts)):
        pass
    timer.step_done()
    assert timer.take().tokens is None
    tensors = [torch.tensor(5), torch.tensor(7)]
    for _ in timer.timed([(0, torch.zeros(2)), (1, torch.zeros(2))], lambda b: tensors.pop()):
        pass
    timer.step_done()
    assert timer.take().tokens == 12.0


def test_throughput_over_ranks_by_hand():
    # 2 data-parallel groups x 2 tensor-parallel peers = 4 ranks, 10 steps. Each rank consumed
    # 80 samples (its dp group's), 80 * 512 tokens. The slowest rank's training time is 5 s.
    windows = [
        window(steps=10, step_s=4.0, data_s=0.4, barrier_s=1.0, samples=80, tokens=80 * 512),
        window(steps=10, step_s=4.5, data_s=0.9, barrier_s=0.5, samples=80, tokens=80 * 512),
        window(steps=10, step_s=4.9, data_s=0.0, barrier_s=0.0, samples=80, tokens=80 * 512),
        window(steps=10, step_s=3.0, data_s=1.0, barrier_s=2.0, samples=80, tokens=80 * 512),
    ]
    got = throughput_metrics(windows, dp_size=2)
    assert got == pytest.approx(
        {
            "train/step_time_s": 5.0 / 10,
            "train/samples_per_s": 160 / 5.0,  # 2 dp groups x 80 samples in 5 s
            "train/samples_per_s_per_device": 160 / 5.0 / 4,
            "train/tokens_per_s": 160 * 512 / 5.0,
            "train/tokens_per_s_per_device": 160 * 512 / 5.0 / 4,
            "train/data_wait_fraction": (0.4 / 5 + 0.9 / 5 + 0.0 / 4.9 + 1.0 / 5) / 4,
            "train/data_wait_fraction_max": 0.2,
        }
    )


def test_no_token_metrics_without_counts():
    got = throughput_metrics([window(tokens=None)], dp_size=1)
    assert "train/tokens_per_s" not in got
    assert got["train/samples_per_s"] == 32 / 2.0


def test_mfu_from_a_known_step_time_and_peak():
    # 8 sequences of 2048 tokens per step per device, 0.5 s per step, 6e9 FLOPs per token,
    # an H100 SXM's 989.5 TFLOP/s: 32768 tokens/s/device -> 196.6 TFLOP/s -> MFU 0.1987.
    tokens_per_s = 8 * 2048 / 0.5
    peak = peak_flops_for_name("NVIDIA H100 80GB HBM3")
    assert peak == 989.5e12
    got = flops_metrics(tokens_per_s, 6e9, peak)
    assert got == pytest.approx(
        {"train/tflops_per_device": 196.608, "train/mfu": 196.608e12 / 989.5e12}
    )
    assert flops_metrics(tokens_per_s, 6e9, None) == {"train/tflops_per_device": 196.608}


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.5e12),
        ("NVIDIA H100 PCIe", 756.5e12),
        ("NVIDIA H100 NVL", 835.5e12),
        ("NVIDIA H200", 989.5e12),
        ("NVIDIA H200 NVL", 835.5e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100-PCIE-40GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA B200", 2.25e15),
        ("NVIDIA GB200", 2.5e15),
        ("AMD Instinct MI300X", 1307.4e12),
        ("NVIDIA L40S", 362.05e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA A10G", None),  # no vendor figure: no MFU rather than a guess
        ("NVIDIA GeForce RTX 4090", None),
        ("NVIDIA H100", None),  # which H100? not guessed
        ("Some Accelerator 9000", None),
    ],
)
def test_peak_table_by_device_name(name, peak):
    assert peak_flops_for_name(name) == peak


def test_the_cpu_has_no_peak():
    assert peak_flops_for(torch.device("cpu")) is None


def test_declared_flops_per_token_from_attribute_or_method():
    with_attr, with_method, plain = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), torch.nn.ReLU()
    with_attr.flops_per_token = 12.0  # type: ignore[assignment]
    with_method.flops_per_token = lambda: 30  # type: ignore[assignment]
    assert declared_flops_per_token([with_attr, with_method, plain]) == 42.0
    assert declared_flops_per_token([plain]) is None
    plain.flops_per_token = "a lot"  # type: ignore[assignment]
    with pytest.raises(TypeError, match="must be a number"):
        declared_flops_per_token([plain])
    assert flops.PEAK_BF16_FLOPS  # the table is public for users to read


def test_memory_reduced_as_max_and_mean():
    per_rank = [
        {"peak_allocated_gib": 10.0, "peak_reserved_gib": 12.0, "peak_rss_gib": 3.0},
        {"peak_allocated_gib": 14.0, "peak_reserved_gib": 16.0, "peak_rss_gib": 5.0},
    ]
    assert memory_metrics(per_rank) == {
        "memory/peak_allocated_gib": 14.0,
        "memory/peak_allocated_gib_mean": 12.0,
        "memory/peak_reserved_gib": 16.0,
        "memory/peak_reserved_gib_mean": 14.0,
        "memory/peak_rss_gib": 5.0,
        "memory/peak_rss_gib_mean": 4.0,
    }


def test_host_peak_rss_is_per_window_where_linux_lets_it_be_reset():
    peaks = MemoryPeaks(torch.device("cpu"))
    first = peaks.read()
    assert list(first) == [peaks.rss_key]
    if not peaks.windowed_rss:
        pytest.skip("this system does not let /proc/self/clear_refs reset VmHWM")
    block = bytearray(256 * 2**20)
    for i in range(0, len(block), 4096):  # touch every page: they become resident
        block[i] = 1
    del block  # freed before the window ends: only the peak remembers it
    grown = peaks.read()["peak_rss_gib"]
    after = peaks.read()["peak_rss_gib"]
    assert grown - after > 0.2  # the 256 MiB peak was the last window's, not this one's


def test_rank_balance_metrics_and_a_slow_rank_named():
    # Rank 1 computes 3x as long; rank 0 waits for it at the log barrier.
    windows = [
        window(steps=4, step_s=0.8, barrier_s=1.6),
        window(steps=4, step_s=2.4, barrier_s=0.0),
    ]
    assert balance_metrics(windows) == pytest.approx(
        {
            "ranks/step_time_min_s": 0.2,
            "ranks/step_time_max_s": 0.6,
            "ranks/step_time_spread": 3.0,
            "ranks/busy_fraction_min": 1 / 3,
            "ranks/busy_fraction_mean": (1 / 3 + 1) / 2,
        }
    )
    found = diagnose(windows)
    assert list(found) == ["imbalance"]
    assert "rank 1 took 0.6 s per step, rank 0 0.2 s (spread 3.00x)" in found["imbalance"]
    assert "rank 0 was busy only 33% of the time" in found["imbalance"]
    assert "at the log barrier 67%" in found["imbalance"]


def test_ranks_taking_turns_are_recognized_and_balanced_ranks_are_quiet():
    # Each of 4 ranks computes a quarter of the time and waits at the barrier for the rest.
    turns = [window(steps=4, step_s=0.5, barrier_s=1.5) for _ in range(4)]
    assert list(diagnose(turns)) == ["turns"]
    assert "busy rank 0 25%, rank 1 25%, rank 2 25%, rank 3 25%" in diagnose(turns)["turns"]
    balanced = [window(step_s=2.0, barrier_s=0.05), window(step_s=2.05, barrier_s=0.0)]
    assert diagnose(balanced) == {}
    # Every rank data-bound: slow, but not taking turns (the waiting is on data).
    starved = [window(step_s=2.0, data_s=1.5, barrier_s=0.0) for _ in range(2)]
    assert diagnose(starved) == {}
    assert balance_metrics([window()]) == {}  # one rank: nothing to compare


def test_warnings_are_rate_limited_per_kind(caplog):
    warnings = BalanceWarnings(every_n_windows=3)
    slow = [window(step_s=1.0, barrier_s=2.0), window(step_s=3.0)]
    with caplog.at_level(logging.WARNING, logger="dream_trainer.metrics"):
        warned = [sorted(warnings.check(slow, step)) for step in range(1, 8)]
    assert warned == [["imbalance"], [], [], ["imbalance"], [], [], ["imbalance"]]
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["step 1", "step 4", "step 7"]


def test_placements_merge_layer_indices_and_name_the_mesh_dims():
    from dream_trainer.trainer.startup_summary import parameter_placements, placement_of

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    rows = parameter_placements([model])
    assert rows == [("*.weight", "whole on each rank"), ("*.bias", "whole on each rank")]
    assert placement_of(torch.zeros(1)) == "whole on each rank"
