"""The prepared accelerator scripts in benchmarks/gpu: they run here on CPU in small form, and in
full where a CUDA device is present."""

from __future__ import annotations

import pytest
import torch

from benchmarks.gpu import context_attention


def test_context_attention_check_passes_on_cpu_in_small_form(capsys):
    assert context_attention.main(["--device", "cpu", "--smoke"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out
    for case in context_attention.CASES:
        rows = [line for line in out.splitlines() if line[:16].rstrip() == case.name]
        assert len(rows) == 4  # balanced or not, allgather and alltoall


def test_a_wrong_merge_fails_the_check(monkeypatch, capsys):
    def drops_the_old_blocks(out, lse, block_out, block_lse):
        return block_out.float(), block_lse

    monkeypatch.setattr(context_attention, "_merge", drops_the_old_blocks)
    assert context_attention.main(["--device", "cpu", "--smoke"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_context_attention_check_passes_on_cuda():
    assert context_attention.main(["--cp", "2", "4", "--seq", "4096", "--repeats", "3"]) == 0
