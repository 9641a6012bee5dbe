"""Data-parallel batch inference: even contiguous splits, every result once, in input order."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from dream_trainer.inference import (
    InferenceEngine,
    InferenceError,
    JsonlResultFile,
    distributed_map,
    distributed_map_to_jsonl,
    even_split,
)
from tests.multirank import REPO_ROOT, run_on_ranks

# ----------------------------------------------------------------------------- splitting


@pytest.mark.parametrize("n_parts", [1, 2, 3, 4, 7])
def test_every_split_is_contiguous_and_as_even_as_possible(n_parts: int) -> None:
    for n_items in range(38):
        parts = even_split(n_items, n_parts)
        assert len(parts) == n_parts
        assert [i for part in parts for i in part] == list(range(n_items))
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)  # the larger shares come first


def test_33_items_on_4_replicas_are_9_8_8_8() -> None:
    assert [len(p) for p in even_split(33, 4)] == [9, 8, 8, 8]
    assert even_split(33, 4)[1] == range(9, 17)


def test_bad_split_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match="n_parts must be at least 1, got 0"):
        even_split(3, 0)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        distributed_map(lambda batch: batch, [1], batch_size=0)
    with pytest.raises(ValueError, match="on_error must be one of"):
        distributed_map(lambda batch: batch, [1], on_error="retry")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- ordered map


def ragged(item: int) -> Any:
    """A nested, ragged result: strings, lists, dicts, tensors of different lengths."""
    return {"id": item, "text": "x" * item, "values": list(range(item % 4)),
            "tensor": torch.arange(item % 5, dtype=torch.float32), "pair": (item, str(item))}  # fmt: skip


def _ragged_batch(batch: list[int]) -> list[Any]:
    return [ragged(i) for i in batch]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def _map_every_count(batch_size: int) -> dict[str, Any]:
    """On each rank: N = 0..37 items; which items this rank computed, and what rank 0 got."""
    seen: list[list[int]] = []
    ok = []
    for n in range(38):
        mine: list[int] = []

        def fn(batch: list[int], mine: list[int] = mine) -> list[Any]:
            mine.extend(batch)
            return _ragged_batch(batch)

        out = distributed_map(fn, list(range(n)), batch_size=batch_size)
        seen.append(mine)
        if dist.get_rank() == 0:
            assert out is not None
            ok.append(len(out) == n and all(_same(r, ragged(i)) for i, r in enumerate(out)))
        else:
            ok.append(out is None)
    return {"seen": seen, "ok": ok}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_0_to_37_items_come_back_once_in_order_with_every_documented_split(
    world_size: int,
) -> None:
    results = run_on_ranks(_map_every_count, world_size, 3, timeout=120)
    for rank, result in enumerate(results):
        assert all(result["ok"]), f"rank {rank}: wrong results for N={result['ok'].index(False)}"
        for n, mine in enumerate(result["seen"]):
            assert mine == list(even_split(n, world_size)[rank]), (n, rank)


def _gather_all_and_tensor_outputs() -> list[Any] | None:
    return distributed_map(
        lambda b: [torch.full((i,), float(i)) for i in b], [3, 1, 2], gather="all"
    )


def test_gather_all_returns_the_results_on_every_rank() -> None:
    for out in run_on_ranks(_gather_all_and_tensor_outputs, 2):
        assert out is not None and [t.tolist() for t in out] == [[3.0] * 3, [1.0], [2.0] * 2]


class _Doubler:
    """An engine: any object with ``infer(batch)``."""

    def infer(self, batch: list[int]) -> list[int]:
        return [2 * i for i in batch]


def test_an_engine_serves_a_replica() -> None:
    assert isinstance(_Doubler(), InferenceEngine)
    assert distributed_map(_Doubler(), [1, 2, 3], batch_size=2) == [2, 4, 6]


def _different_counts() -> str:
    try:
        distributed_map(_ragged_batch, list(range(3 + dist.get_rank())))
    except ValueError as error:
        return str(error)
    return "no error"


def test_ranks_passing_different_items_get_an_error_naming_the_counts() -> None:
    message = run_on_ranks(_different_counts, 2)[0]
    assert "the item counts differ: 3 on ranks [0]; 4 on ranks [1]" in message


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _logged_run(n_items: int) -> list[str]:
    handler = _Records()
    log = logging.getLogger("dream_trainer.inference")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        distributed_map(_ragged_batch, list(range(n_items)))
    finally:
        log.removeHandler(handler)
        log.setLevel(logging.NOTSET)
    return handler.lines


def test_logs_name_workers_assignments_and_received_results_and_idle_ranks() -> None:
    logs = run_on_ranks(_logged_run, 4, 3)
    assert "starting 4 data-parallel workers (4 ranks) for 3 items, batch size 1" in logs[0]
    assert "worker rank 2 (replica 2) is ready" in logs[0]
    assert "assigned 1 items to replica 0 (rank 0)" in logs[0]
    assert "assigned 0 items to replica 3 (rank 3)" in logs[0]
    assert "received 1 results from replica 1 (rank 1)" in logs[0]
    assert any(line.startswith("rank 3 has 0 items") for line in logs[3])
    assert not any("has 0 items" in line for line in logs[1])


# ----------------------------------------------------------------------------- failures


def _flaky(batch: list[int]) -> list[int]:
    if dist.get_rank() == 1:
        raise RuntimeError("CUDA out of memory (simulated)")
    return [i * 10 for i in batch]


def _fail(on_error: str) -> dict[str, Any]:
    try:
        out = distributed_map(_flaky, list(range(10)), batch_size=2, on_error=on_error)  # type: ignore[arg-type]
    except InferenceError as error:
        return {"error": str(error), "failed": [(f.rank, f.indices) for f in error.failures]}
    return {"value": out}


def test_a_failed_rank_is_named_with_its_items_on_every_rank() -> None:
    for result in run_on_ranks(_fail, 3, "raise"):
        assert result["failed"] == [(1, [4, 5]), (1, [6])]  # share 4, 5, 6 of 4, 3, 3
        assert "rank 1 (replica 1) failed on items [4, 5]: " in result["error"]
        assert "CUDA out of memory (simulated)" in result["error"]
        assert "on_error='rerun_on_remaining'" in result["error"]


@pytest.mark.parametrize("on_error", ["rerun_on_remaining", "rerun_on_one"])
def test_the_failed_share_reruns_elsewhere_without_losing_or_duplicating(on_error: str) -> None:
    results = run_on_ranks(_fail, 3, on_error)
    assert results[0] == {"value": [i * 10 for i in range(10)]}
    assert results[1] == results[2] == {"value": None}


def _lockstep(n_items: int) -> list[float] | None:
    """Each call all-reduces over the world, as an FSDP forward all-gathers: ranks must agree."""

    def fn(batch: list[int]) -> list[float]:
        total = torch.tensor([float(len(batch))])
        dist.all_reduce(total)
        return [float(i) for i in batch]

    return distributed_map(fn, list(range(n_items)), batch_size=2, lockstep=True)


def test_lockstep_ranks_out_of_items_run_padding_batches_and_nothing_hangs() -> None:
    results = run_on_ranks(_lockstep, 4, 5, timeout=60)  # shares 2, 1, 1, 1 -> one round each
    assert results[0] == [0.0, 1.0, 2.0, 3.0, 4.0]
    results = run_on_ranks(_lockstep, 4, 2, timeout=60)  # ranks 2 and 3 have nothing at all
    assert results[0] == [0.0, 1.0]


# ----------------------------------------------------------------------------- JSONL streaming


def _records(n: int) -> list[dict[str, Any]]:
    return [{"id": f"case-{i:03d}", "text": "y" * (i % 7)} for i in range(n)]


def _lengths(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"length": len(r["text"]), "upper": r["text"].upper()} for r in batch]


def _stream(path: str, n: int, resume: bool) -> tuple[int, int]:
    summary = distributed_map_to_jsonl(_lengths, _records(n), path, resume=resume, batch_size=2)
    return summary.written, summary.skipped


def test_a_dataset_streams_to_jsonl_in_input_order(tmp_path: Path) -> None:
    path = str(tmp_path / "out.jsonl")
    assert run_on_ranks(_stream, 3, path, 23, False)[0] == (23, 0)
    records = JsonlResultFile(path).records()
    assert [r["id"] for r in records] == [r["id"] for r in _records(23)]
    assert records[5] == {"id": "case-005", "length": 5, "upper": "YYYYY"}
    message = run_on_ranks(_stream_error, 3, path)[1]
    assert "already holds results; pass resume=True" in message  # and nothing was lost:
    assert len(JsonlResultFile(path).records()) == 23


def _stream_error(path: str) -> str:
    try:
        _stream(path, 23, False)
    except FileExistsError as error:
        return str(error)
    return "no error"


_KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from dream_trainer.inference import distributed_map_to_jsonl
from tests.test_inference import _lengths, _records

def fn(batch):
    if any(r["id"] == "case-017" for r in batch):
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-stream, between two windows' writes
    return _lengths(batch)

distributed_map_to_jsonl(fn, _records(30), {path!r}, batch_size=2, window=4)
"""


def test_resume_after_a_kill_mid_stream_gives_each_key_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    script = _KILLER.format(root=str(REPO_ROOT), path=str(path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    written_before = [r["id"] for r in JsonlResultFile(path).records()]
    assert written_before == [f"case-{i:03d}" for i in range(16)]  # whole windows only
    with open(path, "ab") as file:  # and a torn half line, as a writer killed mid-write leaves
        file.write(b'{"id": "case-016", "len')
    assert run_on_ranks(_stream, 2, str(path), 30, True)[0] == (14, 16)
    records = JsonlResultFile(path).records()
    assert [r["id"] for r in records] == [r["id"] for r in _records(30)]
    expected = [{"id": r["id"], **_lengths([r])[0]} for r in _records(30)]
    assert records == expected


def test_a_corrupt_line_before_the_end_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 3}\n')
    with pytest.raises(ValueError, match=r"out.jsonl:2 is not a JSON object"):
        JsonlResultFile(path).recover()


def test_repeated_or_missing_primary_keys_are_errors(tmp_path: Path) -> None:
    items = [{"id": 1}, {"id": 2}, {"id": 1}]
    with pytest.raises(ValueError, match=r"primary key 1 appears twice \(items 0 and 2\)"):
        distributed_map_to_jsonl(_lengths, items, tmp_path / "a.jsonl")
    with pytest.raises(ValueError, match="item 0 has no primary key 'case_id'"):
        distributed_map_to_jsonl(_lengths, [{"id": 1}], tmp_path / "a.jsonl", key="case_id")
    assert not (tmp_path / "a.jsonl").exists()


def test_a_failure_keeps_the_finished_records_and_names_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"

    def fn(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if any(r["id"] == "case-005" for r in batch):
            raise ValueError("bad record")
        return _lengths(batch)

    with pytest.raises(InferenceError, match=r"failed on keys \['case-004', 'case-005'\]"):
        distributed_map_to_jsonl(fn, _records(12), path, batch_size=2, window=4)
    assert [r["id"] for r in JsonlResultFile(path).records()] == [
        "case-000", "case-001", "case-002", "case-003", "case-006", "case-007",
    ]  # fmt: skip
    summary = distributed_map_to_jsonl(_lengths, _records(12), path, resume=True, batch_size=2)
    assert (summary.written, summary.skipped) == (6, 6)
    ids = [r["id"] for r in JsonlResultFile(path).records()]
    assert sorted(ids) == [r["id"] for r in _records(12)] and len(set(ids)) == 12
    assert json.loads(path.read_text().splitlines()[-1])["id"] == "case-011"


def _failing_in_lockstep() -> str:
    # Every rank fails: one that did not would wait in the exchange for the failed one (in a real
    # launch the launcher ends it; here it would hold the rank pool until the gloo timeout).
    def fn(batch: list[int]) -> list[int]:
        raise RuntimeError(f"bad shard on rank {dist.get_rank()}")

    try:
        distributed_map(fn, list(range(4)), lockstep=True, on_error="rerun_on_remaining")
    except InferenceError as error:
        return str(error)
    return "no error"


def test_a_failure_in_lockstep_stops_at_once_naming_the_rank() -> None:
    message = run_on_ranks(_failing_in_lockstep, 2)[1]
    assert (
        "rank 1 (replica 1) failed on items [2]: " in message and "bad shard on rank 1" in message
    )
    assert (
        "runs in lockstep (its forward has collectives), so a failed rank stops the job" in message
    )
