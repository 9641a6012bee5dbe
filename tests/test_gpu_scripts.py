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


def test_llama_throughput_runs_end_to_end_on_cpu_in_small_form(capsys):
    from benchmarks.gpu import llama_throughput

    assert llama_throughput.main(["--smoke", "--variants", "eager", "compile+float8"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("eager ")]
    assert [row[1] for row in rows[:2]] == ["trainer", "hand"]
    assert all(float(row[3].replace(",", "")) > 0 for row in rows[:2])  # tokens/s
    assert "eager           trainer / hand-written step time:" in out
    assert "compile+float8  skipped:" in out  # no float8 matmul on a CPU: said, not hidden


def test_the_gpu_shell_scripts_parse():
    import subprocess
    from pathlib import Path

    scripts = sorted((Path(__file__).parent.parent / "benchmarks/gpu").glob("*.sh"))
    assert len(scripts) == 2
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
