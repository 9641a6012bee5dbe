"""``dream-trainer plan``, the script loader, the suggestions and the schedule simulation."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import planner as planner_bench
from dream_trainer.configs import DeviceParameters
from dream_trainer.launch import (
    TransformerShape,
    main,
    plan_layout,
    suggest_layouts,
    trainer_from_script,
)
from dream_trainer.launch.activations import in_flight_microbatches
from dream_trainer.launch.memory import coordinates
from dream_trainer.launch.plan_cli import split_plan_argv
from dream_trainer.launch.plan_report import describe_ranks, parse_bytes
from dream_trainer.launch.suggest import candidate_layouts
from dream_trainer.world import MeshLayout, fake_world
from examples.llama3.train import Llama3Trainer

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "examples" / "llama3" / "train.py")
DEBUG = ["--config", "debug", "--seq_len", "32", "--batch_size", "2"]


def test_the_script_runs_until_fit_and_hands_over_its_trainer() -> None:
    trainer = trainer_from_script(TRAIN, [*DEBUG, "--device_parameters.tensor_parallel", "2"])
    # The script ran as __main__, so its class is __main__.Llama3Trainer.
    assert (type(trainer).__module__, type(trainer).__name__) == ("__main__", "Llama3Trainer")
    assert trainer.config.device_parameters.tensor_parallel == 2
    assert not hasattr(trainer.world, "layout")  # fit() never ran: no world was launched


def test_scripts_that_do_not_reach_fit_are_explained(tmp_path: Path) -> None:
    quiet = tmp_path / "quiet.py"
    quiet.write_text("print('no trainer here')\n")
    with pytest.raises(RuntimeError, match="finished without calling fit"):
        trainer_from_script(quiet)
    with pytest.raises(RuntimeError, match=r"exited with 2 before calling fit"):
        trainer_from_script(TRAIN, ["--no_such_option", "1"])
    with pytest.raises(FileNotFoundError, match="is not a file"):
        trainer_from_script(tmp_path / "missing.py")
    launches = tmp_path / "launches.py"
    launches.write_text(
        "from dream_trainer.configs import DeviceParameters\n"
        "from dream_trainer.world import DistributedWorld\n"
        "DistributedWorld(DeviceParameters.SINGLE_DEVICE()).launch()\n"
    )
    with pytest.raises(RuntimeError, match="must call super"):
        trainer_from_script(launches)


def test_plan_prints_every_rank_and_exits_by_the_verdict(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["plan", TRAIN, *DEBUG, "--device_parameters.tensor_parallel", "2"]
    assert main([*args, "--world-size", "8", "--devices-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "world: 8 ranks = 2 nodes x 4 devices of 80.0 GiB" in out
    assert "layout: pp=1 dp_replicate=1 dp_shard=4 cp=1 tp=2" in out
    assert "ranks" in out and "0-7" in out and "fits:" in out
    assert main([*args, "--world-size=8", "--device-memory", "1MiB"]) == 1
    assert "does not fit" in capsys.readouterr().out
    tp16 = [*DEBUG, "--device_parameters.tensor_parallel", "16"]
    assert main(["plan", "--world-size", "8", TRAIN, *tp16]) == 2
    assert "16, which does not divide the world size 8" in capsys.readouterr().err
    assert main(["plan", "--world-size", "16", "--devices-per-node", "16", TRAIN, *tp16]) == 2
    assert "refused: ValueError: Tensor-parallel degree 16" in capsys.readouterr().err
    assert main(["plan", TRAIN, "--world-size", "8", "--device-memory", "a lot"]) == 2
    assert "not a size" in capsys.readouterr().err


def test_suggest_ranks_the_layouts_that_fit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", TRAIN, *DEBUG, "--world-size", "4", "--suggest", "2"]) == 0
    out = capsys.readouterr().out
    assert "layouts of 4 ranks that fit, least communication first:" in out
    assert "  1. dp_replicate=4 " in out and "  2. " in out and "  3. " not in out
    tried = suggest_layouts(TRAIN, script_args=DEBUG, world_size=4, device_memory="2MiB", limit=1)
    assert not any(s.fits for s in tried)
    assert any(s.skipped for s in tried) and any(s.plan is not None for s in tried)


def test_candidates_put_the_least_communication_first() -> None:
    layouts = candidate_layouts(16, 8)
    assert layouts[0] == (MeshLayout(dp_replicate=16), "DDP")
    assert layouts[1] == (MeshLayout(dp_replicate=2, dp_shard=8), "HSDP")
    assert layouts[2] == (MeshLayout(dp_shard=16), "FSDP")
    kinds = [kind for _, kind in layouts]
    assert kinds.index("FSDP x TP 2") < kinds.index("FSDP x PP 4") < kinds.index("FSDP x TP 8")
    assert all(layout.world_size == 16 and layout.tp <= 8 for layout, _ in layouts)


def test_plan_arguments_may_follow_the_script() -> None:
    assert split_plan_argv(["s.py", "--config", "8B", "--world-size", "64", "--suggest"]) == (
        ["--world-size", "64", "--suggest=3", "s.py"],
        ["--config", "8B"],
    )
    assert split_plan_argv(["--suggest", "2", "s.py", "-x", "--", "--world-size", "1"]) == (
        ["--suggest", "2", "s.py"],
        ["-x", "--world-size", "1"],
    )


def test_schedules_hold_the_microbatches_torch_runs_them_with() -> None:
    assert in_flight_microbatches("GPipe", 0, 4, 8, 1) == [(8, 0, 0)]
    assert in_flight_microbatches("1F1B", 1, 4, 8, 1) == [(3, 0, 0)]
    # Interleaved1F1B on 2 ranks, 4 microbatches, 2 stages each: rank 0 warms up with 4
    # forwards and runs its fifth before the first backward.
    states = in_flight_microbatches("Interleaved1F1B", 0, 2, 4, 2)
    assert max(live for live, _, _ in states) == 5
    zero_bubble = in_flight_microbatches("ZBVZeroBubble", 1, 2, 4, 2)
    assert max(waiting for _, waiting, _ in zero_bubble) >= 1


def test_small_pieces() -> None:
    assert describe_ranks([0, 1, 2, 3, 8, 9]) == "0-3, 8-9"
    assert describe_ranks([0, 2, 4, 6, 8]).endswith("... (5 ranks)")
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("141GB") == 141 * 10**9
    params = DeviceParameters(
        pipeline_parallel=2, dp_replicate=2, dp_shard=2, context_parallel=2, tensor_parallel=2
    )
    with fake_world(params, world_size=32, rank=27) as world:  # the meshes torch builds
        local = {
            name: world.get_mesh(name).get_local_rank() for name in coordinates(world.layout, 0)
        }
        assert coordinates(world.layout, 27) == local
    with pytest.raises(ValueError, match="seq_len and batch_size"):
        TransformerShape(8, 8, 1, 1, 8, 8, seq_len=0, batch_size=1)


def test_a_trainer_without_a_transformer_shape_reports_no_activations() -> None:
    class NoShape(Llama3Trainer):
        transformer_shape = None  # type: ignore[assignment]

    config = trainer_from_script(TRAIN, DEBUG).config
    plan = plan_layout(lambda: NoShape(config), world_size=2, devices_per_node=2)
    assert plan.worst.memory.activations == 0
    assert plan.activations.startswith("not estimated: NoShape defines no transformer_shape()")
    with pytest.raises(ValueError, match="outside this plan's world of 2 ranks"):
        plan.rank(2)


def test_the_benchmark_prints_a_row(capsys: pytest.CaptureFixture[str]) -> None:
    planner_bench.main(["--only", "8B-64"])
    assert "| 8B-64 FSDP | " in capsys.readouterr().out


def test_an_automatic_layout_is_chosen_as_at_launch() -> None:
    plan = plan_layout(
        TRAIN, script_args=[*DEBUG, "--device_parameters", "auto"], world_size=4, devices_per_node=4
    )
    assert plan.layout.world_size == 4 and plan.device_parameters.auto_layout is None
    assert any(note.startswith("auto layout: ") for note in plan.notes)
