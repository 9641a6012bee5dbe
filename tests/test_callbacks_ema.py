"""EMA: the averages follow the formula, match one process under FSDP (sharded like the weights,
no communication per update), swap in for validation and back exactly, and checkpoint with the
run, resharded when the layout changes."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from dream_trainer.callbacks import EMA
from dream_trainer.configs import DeviceParameters, TrainingParameters
from dream_trainer.trainer import Callback
from tests.multirank import run_on_ranks
from tests.parity_model import ParityConfig, ParityTrainer, TokenDataset, cross_entropy
from tests.test_trainer_parity import full_weights

STEPS = 8
SGD_ATOL = 1e-6  # SGD weights of every layout are within this of one process (test_trainer_parity)


class EMAConfig(ParityConfig):
    with_validation: bool = False


class EMATrainer(ParityTrainer):
    """The parity transformer, with a validation loader when ``config.with_validation``; logs losses."""

    config: EMAConfig

    def configure_dataloaders(self) -> tuple[Any, Any]:
        train, _ = super().configure_dataloaders()
        if not self.config.with_validation:
            return train, None
        val = TokenDataset(16, seed=99)
        sampler = self.distributed_sampler(val, shuffle=False)
        return train, DataLoader(val, batch_size=8 // self.world.dp_size, sampler=sampler)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        loss = self.forward_loss(self.model, batch["inputs"], batch["labels"], cross_entropy)
        return {"val/loss": loss}

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        super().log_dict(metrics, step)
        self.logged.append((step, dict(metrics)))


class Observe(Callback):
    """Full weights after setup and after every optimizer step; EMA views around validation."""

    def __init__(self, ema: EMA, record_steps: bool) -> None:
        self.ema, self.record_steps = ema, record_steps
        self.weights: list[dict[str, torch.Tensor]] = []
        self.during_validation: list[dict[str, torch.Tensor]] = []
        self.averages_at_validation: list[dict[str, torch.Tensor]] = []
        self.loaded: dict[str, torch.Tensor] | None = None

    def post_setup(self) -> None:
        if self.trainer.global_step:  # resumed: what the checkpoint gave the EMA
            self.loaded = _cpu(self.ema.full_averages())
        if self.record_steps:
            self.weights.append(full_weights(self.trainer))

    def post_optimizer_step(self, optimizer: Any) -> None:
        if self.record_steps:
            self.weights.append(full_weights(self.trainer))

    def pre_validation_epoch(self) -> None:  # after EMA's: the models hold the averages
        self.during_validation.append(full_weights(self.trainer))

    def post_validation_epoch(self, results: dict[str, float]) -> None:  # after the swap back
        self.averages_at_validation.append(_cpu(self.ema.full_averages()))


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v.detach().cpu().clone() for k, v in tensors.items()}


class CountingEMA(EMA):
    """Counts the communication of every update (DTensor ops and c10d collectives)."""

    def post_optimizer_step(self, optimizer: Any) -> None:
        from torch.distributed.tensor.debug import CommDebugMode

        with CommDebugMode() as comm:
            super().post_optimizer_step(optimizer)
        self.comm_counts = getattr(self, "comm_counts", [])
        self.comm_counts.append(comm.get_total_counts())


def train(
    params: DeviceParameters,
    ema_kwargs: dict[str, Any],
    max_steps: int = STEPS,
    record_steps: bool = False,
    run_dir: str = "runs",
    checkpoints: bool = False,
    val_every: int | None = None,
    strict: bool = True,
    with_ema: bool = True,
) -> dict[str, Any]:
    config = EMAConfig(
        seed=7,
        with_validation=val_every is not None,
        optimizer="sgd",
        lr=0.5,
        run_dir=run_dir,
        device_parameters=params,
        training_parameters=TrainingParameters(
            n_epochs=2,
            max_steps=max_steps,
            gradient_accumulation_steps=2,
            gradient_clip_val=1.0,
            val_every_n_steps=val_every,
        ),
        logging_parameters={"log_every_n_steps": 1, "backends": []},
        checkpoint_parameters={"enable": checkpoints, "resume": "auto", "strict": strict},
    )
    ema = CountingEMA(**ema_kwargs)
    observe = Observe(ema, record_steps)
    trainer = EMATrainer(config, callbacks=[ema, observe] if with_ema else [])
    trainer.logged = []
    trainer.fit()
    if not with_ema:
        return {"weights": full_weights(trainer)}
    placements = {}
    for key, value in ema.averages.items():
        param = trainer.model.get_parameter(key.removeprefix("model."))
        placements[key] = (*_layout(value), *_layout(param))
    return {
        "ema": _cpu(ema.full_averages()),
        "updates": ema.updates,
        "weights": full_weights(trainer),
        "steps": observe.weights,
        "placements": placements,
        "comm": getattr(ema, "comm_counts", []),
        "during_validation": observe.during_validation,
        "averages_at_validation": observe.averages_at_validation,
        "loaded": observe.loaded,
        "logged": trainer.logged,
        "step": trainer.global_step,
    }


def _layout(tensor: torch.Tensor) -> tuple[str, str]:
    if isinstance(tensor, DTensor):
        return "DTensor", f"{tensor.device_mesh.mesh_dim_names} {tensor.placements}"
    return "Tensor", ""


def expected_ema(
    steps: list[dict[str, torch.Tensor]], decay: float, every: int, warmup: int
) -> dict[str, torch.Tensor]:
    """The EMA from the weights after setup (steps[0]) and after each step (steps[s])."""
    ema = {k: v.clone() for k, v in steps[0].items()}
    for step in range(1, len(steps)):
        if step % every:
            continue
        d = decay * min(1.0, step / warmup) if warmup else decay
        ema = {k: torch.lerp(ema[k], steps[step][k], 1.0 - d) for k in ema}
    return ema


def assert_all_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol, msg=name)


def test_one_process_follows_the_formula_with_warmup_and_every_n_steps():
    kwargs = {"decay": 0.8, "every_n_steps": 2, "warmup_steps": 3}
    (result,) = run_on_ranks(train, 1, DeviceParameters.SINGLE_DEVICE(), kwargs, record_steps=True)
    assert len(result["steps"]) == STEPS + 1 and result["updates"] == STEPS // 2
    want = expected_ema(result["steps"], 0.8, every=2, warmup=3)
    assert_all_close(result["ema"], want, atol=1e-7)
    # Averaging did something: it is neither the first nor the last weights.
    name = "output.weight"
    assert not torch.allclose(result["ema"][name], result["steps"][-1][name], atol=1e-4)
    assert not torch.allclose(result["ema"][name], result["steps"][0][name], atol=1e-4)


@functools.cache
def one_process(**kwargs: Any) -> dict[str, Any]:
    (result,) = run_on_ranks(train, 1, DeviceParameters.SINGLE_DEVICE(), kwargs)
    return result


LAYOUTS = {
    "fsdp2": DeviceParameters.FSDP(),
    "tp2": DeviceParameters.FSDP(dp_shard=1, tensor_parallel=2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_ranks_equal_one_process_sharded_like_the_weights_without_communication(layout):
    kwargs = {"decay": 0.9, "warmup_steps": 4}
    reference = one_process(**kwargs)
    results = run_on_ranks(train, 2, LAYOUTS[layout], kwargs, timeout=300)
    assert reference["updates"] == STEPS
    for rank, result in enumerate(results):
        assert result["updates"] == STEPS
        assert_all_close(result["ema"], reference["ema"], atol=SGD_ATOL)
        assert_all_close(result["weights"], reference["weights"], atol=SGD_ATOL)
        kinds = set()
        for key, (kind, placement, param_kind, param_placement) in result["placements"].items():
            assert (kind, placement) == (param_kind, param_placement), (rank, key)
            kinds.add(kind)
        assert "DTensor" in kinds  # sharded weights have sharded averages (TP: norms are plain)
        assert len(result["comm"]) == STEPS and all(c == 0 for c in result["comm"]), result["comm"]
    # One process: the averages are plain tensors, like its parameters.
    assert {kind for kind, *_ in reference["placements"].values()} == {"Tensor"}


def test_validation_runs_on_the_averages_and_training_gets_its_weights_back_exactly():
    # reshard_after_forward=False keeps FSDP's gathered weights after the validation forward:
    # unless they are dropped, the next training step would run on the averages.
    params = DeviceParameters.FSDP(reshard_after_forward=False)
    base = {"decay": 0.7}
    swapping = run_on_ranks(train, 2, params, {**base, "validate_with_ema": True}, val_every=3)
    plain = run_on_ranks(train, 2, params, base, val_every=3)
    for rank in range(2):
        swapped, kept = swapping[rank], plain[rank]
        # The losses, not the timing metrics logged beside them.
        train_losses = [(s, m["train/loss"]) for s, m in swapped["logged"] if "train/loss" in m]
        assert train_losses == [
            (s, m["train/loss"]) for s, m in kept["logged"] if "train/loss" in m
        ]
        for name, value in kept["weights"].items():
            assert torch.equal(swapped["weights"][name], value), (rank, name)
        assert_all_close(swapped["ema"], kept["ema"], atol=0)
        # Validation after steps 3 and 6 saw exactly the averages of that moment.
        assert len(swapped["during_validation"]) == 2
        for seen, averages in zip(swapped["during_validation"], swapped["averages_at_validation"]):
            assert_all_close(seen, averages, atol=0)
        val = [m["val/loss"] for _, m in swapped["logged"] if "val/loss" in m]
        val_plain = [m["val/loss"] for _, m in kept["logged"] if "val/loss" in m]
        assert len(val) == 2 and val != val_plain
        for seen in kept["during_validation"]:  # without the option: the training weights
            assert not all(torch.equal(seen[n], swapped["during_validation"][0][n]) for n in seen)


def test_checkpoints_resume_the_averages_exactly_and_reshard_them_across_layouts(tmp_path):
    kwargs = {"decay": 0.9, "warmup_steps": 2}
    fsdp, single = DeviceParameters.FSDP(), DeviceParameters.SINGLE_DEVICE()
    straight = run_on_ranks(train, 2, fsdp, kwargs, run_dir=str(tmp_path / "a"), timeout=300)
    same = str(tmp_path / "b")
    first = run_on_ranks(train, 2, fsdp, kwargs, 4, run_dir=same, checkpoints=True)
    resumed = run_on_ranks(train, 2, fsdp, kwargs, STEPS, run_dir=same, checkpoints=True)
    for rank in range(2):
        assert resumed[rank]["loaded"] is not None
        assert_all_close(resumed[rank]["loaded"], first[rank]["ema"], atol=0)
        assert_all_close(resumed[rank]["ema"], straight[rank]["ema"], atol=0)  # bit for bit
        assert resumed[rank]["updates"] == STEPS
    # FSDP on 2 ranks -> one process -> FSDP on 2 ranks: each resume loads what was saved.
    chain = str(tmp_path / "c")
    (head,) = run_on_ranks(train, 2, fsdp, kwargs, 3, run_dir=chain, checkpoints=True)[:1]
    (middle,) = run_on_ranks(train, 1, single, kwargs, 6, run_dir=chain, checkpoints=True)
    tail = run_on_ranks(train, 2, fsdp, kwargs, STEPS, run_dir=chain, checkpoints=True)
    assert_all_close(middle["loaded"], head["ema"], atol=0)
    for rank in range(2):
        assert_all_close(tail[rank]["loaded"], middle["ema"], atol=0)
        assert_all_close(tail[rank]["ema"], straight[rank]["ema"], atol=SGD_ATOL)
    assert tail[0]["updates"] == STEPS


def test_resuming_a_checkpoint_without_averages_non_strictly_starts_them_from_its_weights(tmp_path):
    single, run_dir = DeviceParameters.SINGLE_DEVICE(), str(tmp_path)
    (saved,) = run_on_ranks(
        train, 1, single, {}, 3, run_dir=run_dir, checkpoints=True, with_ema=False
    )
    (resumed,) = run_on_ranks(
        train, 1, single, {"decay": 0.5}, 5, True, run_dir, checkpoints=True, strict=False
    )
    assert resumed["updates"] == 2 and resumed["step"] == 5
    assert_all_close(resumed["loaded"], saved["weights"], atol=0)
    assert_all_close(resumed["steps"][0], saved["weights"], atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"decay": 1.0}, ValueError, r"EMA\(decay=1.0\): decay must be a number strictly between"),
        ({"decay": 0}, ValueError, r"EMA\(decay=0\)"),
        ({"decay": -0.5}, ValueError, r"EMA\(decay=-0.5\)"),
        ({"decay": "0.9"}, ValueError, r"EMA\(decay='0.9'\)"),
        ({"every_n_steps": 0}, ValueError, r"EMA\(every_n_steps=0\): every_n_steps must be >= 1"),
        ({"every_n_steps": 1.5}, TypeError, r"every_n_steps must be an integer"),
        ({"warmup_steps": -1}, ValueError, r"EMA\(warmup_steps=-1\): warmup_steps must be >= 0"),
        ({"models": "model"}, TypeError, r"give a list of model names, e.g. \['model'\]"),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument_and_value(kwargs, error, match):
    with pytest.raises(error, match=match):
        EMA(**kwargs)


def unknown_model() -> str:
    config = ParityConfig(
        device_parameters=DeviceParameters.SINGLE_DEVICE(),
        training_parameters=TrainingParameters(max_steps=1),
        logging_parameters={"backends": []},
    )
    try:
        ParityTrainer(config, callbacks=[EMA(models=["decoder"])]).fit()
    except ValueError as error:
        return str(error)
    return "no error"


def test_an_unknown_model_name_fails_at_setup_naming_the_models():
    (message,) = run_on_ranks(unknown_model, 1)
    assert "EMA(models=['decoder'])" in message and "['model']" in message
    assert "['decoder'] are not among them" in message
