"""The dream-trainer command: arguments, torchrun's options, exit codes, SLURM and two nodes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dream_trainer.launch import DEFAULT_RDZV_ID, RunPlan, build_parser, choose_nproc, main
from dream_trainer.launch import cli as launch_cli
from dream_trainer.world import environment
from tests.multirank import REPO_ROOT, _free_port, _kill_tree, run_on_ranks

if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="the launch tests rely on Linux process handling")

SBATCH = REPO_ROOT / "examples/slurm/train.sbatch"


def planned(monkeypatch: pytest.MonkeyPatch, *argv: str) -> tuple[int, RunPlan]:
    """What ``dream-trainer ARGV`` would start, without starting it."""
    plans: list[RunPlan] = []
    monkeypatch.setattr(launch_cli, "run_agent", lambda plan: plans.append(plan) or 7)
    code = main(list(argv))
    return code, plans[0]


# Arguments


def test_everything_after_the_script_reaches_it_untouched(monkeypatch, tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    code, plan = planned(
        monkeypatch, "run", "--nproc", "3", str(script), "--nproc", "9", "--", "-h", "x"
    )
    assert code == 7  # run_agent's code is the command's
    assert (plan.script, plan.script_args, plan.nproc) == (
        str(script),
        ("--nproc", "9", "--", "-h", "x"),
        3,
    )
    _, after_dashes = planned(monkeypatch, "run", "--nproc=2", "--", str(script), "--config")
    assert (after_dashes.nproc, after_dashes.script_args) == (2, ("--config",))


def test_one_node_runs_standalone_and_several_meet_at_the_endpoint(monkeypatch, tmp_path):
    from torch.distributed import run as torchrun

    script = tmp_path / "train.py"
    script.write_text("")
    _, local = planned(monkeypatch, "run", "--nproc", "2", str(script), "--config", "debug")
    options = torchrun.parse_args(local.torchrun_args())  # torch's own parser accepts them
    assert options.standalone and options.nproc_per_node == "2" and options.nnodes == "1"
    assert (options.training_script, options.training_script_args) == (
        str(script),
        ["--config", "debug"],
    )
    _, node = planned(
        monkeypatch,
        *("run", "--nproc", "4", "--nnodes", "2", "--node-rank", "1"),
        *("--rdzv-endpoint", "node0:29400", str(script)),
    )
    options = torchrun.parse_args(node.torchrun_args())
    assert not options.standalone
    assert (options.rdzv_backend, options.rdzv_endpoint, options.rdzv_id) == (
        "c10d",
        "node0:29400",
        DEFAULT_RDZV_ID,
    )
    assert (options.nnodes, options.rdzv_conf, options.max_restarts) == ("2", "is_host=0", 0)
    host = RunPlan(str(script), nnodes=2, node_rank=0, rdzv_endpoint="h:1", rdzv_id="42")
    assert host.torchrun_args()[-3:] == ["--rdzv-conf", "is_host=1", str(script)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
        (
            ["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"],
            "--node-rank 2 is out of range for --nnodes 2; give 0 to 1",
        ),
        (["--rdzv-endpoint", "node0"], "must be HOST:PORT"),
        (["--nproc", "0"], "must be a positive integer, got '0'"),
    ],
)
def test_inconsistent_options_are_refused_with_the_fix(capsys, tmp_path, argv, message):
    script = tmp_path / "train.py"
    script.write_text("")
    with pytest.raises(SystemExit) as caught:
        main(["run", *argv, str(script)])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_script_is_named(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["run", str(tmp_path / "trian.py")])
    assert f"SCRIPT '{tmp_path / 'trian.py'}' is not a file" in capsys.readouterr().err


def test_process_count_follows_the_accelerators(monkeypatch):
    monkeypatch.setattr(environment, "visible_accelerators", lambda: ("cuda", 8))
    assert choose_nproc(None) == (8, "one per visible cuda device")
    count, why = choose_nproc(12)
    assert count == 12 and "only 8 cuda device(s) are visible" in why
    monkeypatch.setattr(environment, "visible_accelerators", lambda: ("cpu", 0))
    count, why = choose_nproc(None)
    assert count == 1 and "no accelerator is visible" in why and "--nproc N" in why
    assert choose_nproc(4) == (4, "--nproc 4")


def test_help_describes_every_option():
    run_help = launch_cli._subparser(build_parser(), "run").format_help()
    for option in ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-id"):
        assert option in run_help
    assert "--max-restarts" in run_help and "SCRIPT" in run_help


def test_python_dash_m_dream_trainer_answers_help():
    result = subprocess.run(
        [sys.executable, "-m", "dream_trainer", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: dream-trainer" in result.stdout and "run" in result.stdout


def test_the_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["dream-trainer"] == "dream_trainer.launch.cli:main"


@pytest.mark.parametrize(
    ("raised", "code", "printed"),
    [
        ("killed", 137, "FAILED"),  # a rank killed by SIGKILL, as a shell reports it
        ("signal", 143, "dream-trainer run: stopped by SIGTERM"),
        ("rendezvous", 1, "the rendezvous at node0:29400 failed (nobody came); every node"),
    ],
)
def test_failures_become_exit_codes(monkeypatch, capsys, raised, code, printed):
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    from dream_trainer.launch import agent, run_agent

    errors = {
        "killed": ChildFailedError(
            "train.py", {1: ProcessFailure(local_rank=1, pid=1, exitcode=-9, error_file="")}
        ),
        "signal": SignalException("stop", signal.SIGTERM),
        "rendezvous": RendezvousError("nobody came"),
    }

    def fail(*_: object) -> None:
        raise errors[raised]

    monkeypatch.setattr(agent, "_call_torchrun", fail)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's value is kept
    plan = RunPlan("train.py", nproc=2, nnodes=2, rdzv_endpoint="node0:29400")
    assert run_agent(plan) == code
    assert printed in capsys.readouterr().err
    assert os.environ["OMP_NUM_THREADS"] == "4"


# Running processes


def dream_trainer_run(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``python -m dream_trainer run ARGS`` (what the dream-trainer command runs), captured."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "RANK"))}
    for name in ("WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(name, None)
    full_env.pop("OMP_NUM_THREADS", None)  # dream-trainer run sets it for the ranks
    full_env["PYTHONPATH"] = str(REPO_ROOT)
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "dream_trainer", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=REPO_ROOT,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, _ = proc.communicate(timeout=10)
        raise AssertionError(f"dream-trainer run timed out after {timeout} s:\n{out}") from None
    return proc.returncode, out


RANK_SCRIPT = """\
import os, sys
rank = int(os.environ["RANK"])
print(f"rank {rank}/{os.environ['WORLD_SIZE']} omp={os.environ['OMP_NUM_THREADS']} {sys.argv[1:]}")
sys.exit(3 if rank == 1 else 0)
"""


def test_a_failing_rank_s_exit_code_is_the_command_s(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    code, out = finish(dream_trainer_run(["--nproc", "2", str(script), "--", "-x"]), 60)
    assert code == 3, out
    assert "rank 0/2 omp=1 ['--', '-x']" in out and "rank 1/2 omp=1" in out
    assert "dream-trainer run: 2 processes on this node: --nproc 2" in out
    assert "exitcode  : 3" in out  # torchrun's failure report names the rank


# Two "nodes" on loopback: HSDP replicated across them, sharded within each


def tiny_tokenizer(corpus: list[str], path: Path) -> Path:
    from examples.llama3.tokenizer import _train

    _train(corpus, 300, path)
    return path


def llama_args(data: Path, tokenizer: Path, run_dir: Path, batch_size: int) -> list[str]:
    tiny = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32}
    fields = {
        "model_overrides": json.dumps(tiny),
        "seq_len": 32,
        "batch_size": batch_size,
        "lr": 1e-3,
        "warmup_steps": 2,
        "data": data,
        "tokenizer": tokenizer,
        "run_dir": run_dir,
        "sample_tokens": 0,
        "training_parameters.max_steps": 4,
        "training_parameters.gradient_accumulation_steps": 2,
        "training_parameters.gradient_clip_val": 1.0,
        "training_parameters.val_steps_per_epoch": 0,
        "logging_parameters.log_every_n_steps": 1,
        "logging_parameters.performance_metrics": "false",
    }
    args = [str(REPO_ROOT / "examples/llama3/train.py"), "--config", "debug"]
    for name, value in fields.items():
        args += [f"--{name}", str(value)]
    return args


def train_script_main(args: list[str], env: dict[str, str]) -> None:
    """examples/llama3/train.py's main, on a rank of tests.multirank."""
    from examples.llama3.train import main as train_main

    os.environ.update(env)
    train_main(args)


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "llama3/debug/latest/metrics.jsonl").read_text().splitlines()
    return [row["train/loss"] for row in map(json.loads, lines) if "train/loss" in row]


def test_two_nodes_on_loopback_train_hsdp_like_one_process(tmp_path):
    import torch

    docs = [f"def f_{i}(v):\n    return v * {i} + {i % 7}\n" * (1 + i % 3) for i in range(200)]
    data = tmp_path / "corpus.jsonl"
    data.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    tokenizer = tiny_tokenizer(docs, tmp_path / "tokenizer.json")
    env = {"DREAM_TRAINER_CACHE": str(tmp_path / "cache")}
    hsdp = ["--device_parameters.dp_shard", "node", "--device_parameters.dp_replicate", "2"]
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [
        dream_trainer_run(
            [
                *("--nnodes", "2", "--node-rank", str(rank), "--nproc", "2"),
                *("--rdzv-endpoint", endpoint, "--rdzv-id", "loopback"),
                *llama_args(data, tokenizer, tmp_path / "hsdp", batch_size=1),
                *hsdp,
            ],
            env,
        )
        for rank in (0, 1)
    ]
    # The same global batch (4 ranks x 1 x 2 accumulated = 1 x 4 x 2) in one process, meanwhile.
    single = llama_args(data, tokenizer, tmp_path / "single", batch_size=4)
    run_on_ranks(train_script_main, 1, single[1:], env, timeout=180)
    results = {name: finish(proc, 180) for name, proc in zip(("node 0", "node 1"), nodes)}
    for name, (code, out) in results.items():
        assert code == 0, f"{name}:\n{out}"
    both = results["node 0"][1] + results["node 1"][1]
    assert "world size 4 on cpu (gloo, torchrun)" in both
    assert re.search(r"\bdp_replicate\s+2\s+\[0, 2\] \[1, 3\]", both), both
    assert re.search(r"\bdp_shard\s+2\s+\[0, 1\] \[2, 3\]", both), both
    assert all("on this node (one of 2)" in results[n][1] for n in ("node 0", "node 1"))
    expected = losses(tmp_path / "single")
    assert len(expected) == 4
    torch.testing.assert_close(
        torch.tensor(losses(tmp_path / "hsdp")), torch.tensor(expected), rtol=1e-5, atol=0
    )


# SLURM


FAKE_SLURM = {
    # Prints the hosts of the node list, as scontrol does for gpu[003-004].
    "scontrol": "echo gpu003; echo gpu004\n",
    # Runs the command once, as the task of node 1, after printing its own options.
    "srun": 'echo "srun $*" | cut -d" " -f1-3\nwhile [[ $1 == --* ]]; do shift; done\n'
    'SLURM_NODEID=1 exec "$@"\n',
    "dream-trainer": 'echo "dream-trainer $*"\n',
}


def test_the_sbatch_script_parses():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True, timeout=30)
    text = SBATCH.read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and "examples/llama3/train.py" in text


def test_the_sbatch_script_runs_one_agent_per_node_with_the_derived_options(tmp_path):
    for name, body in FAKE_SLURM.items():
        (tmp_path / name).write_text("#!/bin/bash\n" + body)
        (tmp_path / name).chmod(0o755)
    env = {
        "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu[003-004]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_ID": "42",
    }
    result = subprocess.run(
        ["bash", str(SBATCH), "--config", "debug"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=True,
    )
    srun, command = result.stdout.splitlines()
    assert srun == "srun --ntasks-per-node=1 --kill-on-bad-exit=1"
    assert command == (
        "dream-trainer run --node-rank 1 --nnodes 2 --rdzv-endpoint gpu003:20042 "
        "--rdzv-id 42 examples/llama3/train.py --config debug"
    )
    # The options derived in the script are ones dream-trainer run accepts.
    parsed = build_parser().parse_args(command.split()[1:])
    assert (parsed.nnodes, parsed.node_rank, parsed.rdzv_endpoint) == (2, 1, "gpu003:20042")
    with_port = subprocess.run(
        ["bash", "-c", f"source {SBATCH} && rendezvous_options"],
        capture_output=True,
        text=True,
        env={**env, "RDZV_PORT": "29400"},
        timeout=30,
        check=True,
    )
    assert with_port.stdout.split() == [
        *("--nnodes", "2", "--rdzv-endpoint", "gpu003:29400", "--rdzv-id", "42"),
    ]
