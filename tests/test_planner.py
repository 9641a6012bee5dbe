"""The layout planner: its per-rank figures equal what real CPU ranks hold, and it refuses what a
launch refuses, with the same message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from dream_trainer.configs import DeviceParameters, TrainingParameters
from dream_trainer.launch import Plan, plan_layout
from examples.llama3.train import Llama3Config, Llama3Trainer
from tests.multirank import run_on_ranks

# Uneven on purpose: a feed-forward width of 130 and a vocabulary of 2050 leave FSDP and TP
# shards of different sizes (and FSDP's padding) on 2, 4 and 8 ranks.
TINY = {"dim": 48, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 26}
VOCAB = 2050
FSDP_BF16 = DeviceParameters.FSDP(param_dtype="bfloat16", reduce_dtype="float32")
LAYOUTS: dict[str, tuple[int, DeviceParameters]] = {
    "single": (1, DeviceParameters.SINGLE_DEVICE()),
    "ddp": (2, DeviceParameters.DDP()),
    "fsdp_tp": (4, DeviceParameters.FSDP(tensor_parallel=2)),
    "fsdp_bf16": (8, FSDP_BF16),
    "pp_fsdp": (
        8,
        DeviceParameters(
            pipeline_parallel=2,
            dp_shard=4,
            pipeline_parallel_config={"schedule": "1F1B", "num_microbatches": 2},
        ),
    ),
}


def corpus_file(root: Path) -> str:
    path = root / "planner_corpus.jsonl"
    if not path.exists():
        docs = [{"text": f"def f_{i}(x):\n    return x * {i}\n" * 3} for i in range(200)]
        path.write_text("\n".join(json.dumps(d) for d in docs), encoding="utf-8")
    return str(path)


def tiny_config(params: DeviceParameters, data: str, run_dir: str) -> Llama3Config:
    return Llama3Config(
        model="debug",
        model_overrides={**TINY, "vocab_size": VOCAB},
        seq_len=16,
        batch_size=2,
        data=data,
        run_dir=run_dir,
        device_parameters=params,
        training_parameters=TrainingParameters(max_steps=1, num_sanity_val_steps=0),
        logging_parameters={"backends": [], "performance_metrics": False},
    )


class MeasuredTrainer(Llama3Trainer):
    """Records the bytes this rank holds: gradients before the step, state after it."""

    measured: dict[str, int]

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        params = [p for parts in self.model_parts().values() for m in parts for p in m.parameters()]
        self.measured = {
            "parameters": _storage_bytes(params),
            "gradients": _storage_bytes([p.grad for p in params if p.grad is not None]),
        }
        stepped = super().step(optimizer)
        states = [v for s in optimizer.state.values() for v in s.values()]
        # AdamW's step counts stay on the host on an accelerator; the plan lists them apart.
        self.measured["optimizer"] = _storage_bytes([v for v in states if v.dim() > 0])
        self.measured["optimizer_host"] = _storage_bytes([v for v in states if v.dim() == 0])
        return stepped

    def validate(self, max_batches: int | None = None, log: bool = True) -> dict[str, float]:
        return {}


def _storage_bytes(tensors: list[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (FSDP keeps one per unit's grads)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        storage = local.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _train_one_step(layout: str, root: str) -> dict[str, int]:
    """One training step on this rank; its measured bytes."""
    _, params = LAYOUTS[layout]
    trainer = MeasuredTrainer(tiny_config(params, corpus_file(Path(root)), root))
    trainer.fit()
    return trainer.measured


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("planner"))


def plan_for(layout: str, root: str, **kwargs: Any) -> Plan:
    world, params = LAYOUTS[layout]
    config = tiny_config(params, corpus_file(Path(root)), root)
    return plan_layout(
        lambda: MeasuredTrainer(config),
        world_size=world,
        devices_per_node=world,
        device_memory=kwargs.pop("device_memory", "1GiB"),
        **kwargs,
    )


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_plan_equals_what_each_rank_holds(layout: str, root: str) -> None:
    world, _ = LAYOUTS[layout]
    measured = run_on_ranks(_train_one_step, world, layout, root, timeout=240)
    plan = plan_for(layout, root)
    for rank, held in enumerate(measured):
        planned = plan.rank(rank)
        assert {
            "parameters": planned.parameters,
            "gradients": planned.gradients,
            "optimizer": planned.optimizer,
            "optimizer_host": planned.host,
        } == held, f"rank {rank} of {layout}"


# Refusals: the message a launch would give, found on the meta device.


def _message(error: pytest.ExceptionInfo[BaseException]) -> str:
    return str(error.value)


def test_a_tensor_parallel_degree_the_heads_do_not_split_is_refused(root: str) -> None:
    from examples.llama3.configs import check_tensor_parallel_degree, get_model_args

    config = tiny_config(DeviceParameters.FSDP(tensor_parallel=4), corpus_file(Path(root)), root)
    with pytest.raises(ValueError) as refused:
        plan_layout(lambda: MeasuredTrainer(config), world_size=8, devices_per_node=8)
    with pytest.raises(ValueError) as launched:
        check_tensor_parallel_degree(get_model_args("debug", **TINY), 4)
    assert _message(refused) == _message(launched)
    assert "n_kv_heads (2)" in _message(refused)


def test_degrees_that_do_not_multiply_to_the_world_are_refused(root: str) -> None:
    params = DeviceParameters(dp_shard=2, tensor_parallel=2)
    config = tiny_config(params, corpus_file(Path(root)), root)
    with pytest.raises(ValueError, match=r"multiply to 4 .* but the world size is 8"):
        plan_layout(lambda: MeasuredTrainer(config), world_size=8, devices_per_node=8)


def test_a_batch_the_pipeline_cannot_cut_is_refused(root: str) -> None:
    params = DeviceParameters(
        pipeline_parallel=2, dp_shard=1, pipeline_parallel_config={"num_microbatches": 4}
    )
    config = tiny_config(params, corpus_file(Path(root)), root)  # batch_size 2
    with pytest.raises(ValueError, match=r"batch of 2 samples .* num_microbatches=4"):
        plan_layout(lambda: MeasuredTrainer(config), world_size=2, devices_per_node=2)


def test_a_sequence_context_parallelism_cannot_cut_is_refused(root: str) -> None:
    params = DeviceParameters(dp_shard=1, context_parallel=4)
    config = tiny_config(params, corpus_file(Path(root)), root)
    config = config.model_copy(update={"seq_len": 20})  # 2 x 4 chunks do not divide 20
    with pytest.raises(ValueError, match=r"sequence of 20 tokens .* a multiple of 8"):
        plan_layout(lambda: MeasuredTrainer(config), world_size=4, devices_per_node=4)


def test_a_running_process_group_and_bad_arguments_are_refused(root: str) -> None:
    config = tiny_config(DeviceParameters.FSDP(), corpus_file(Path(root)), root)
    with pytest.raises(ValueError, match="whole number of nodes of 8"):
        plan_layout(lambda: MeasuredTrainer(config), world_size=12, devices_per_node=8)
    with pytest.raises(ValueError, match="not a size"):
        plan_layout(lambda: MeasuredTrainer(config), world_size=8, device_memory="lots")
    with pytest.raises(TypeError, match="a trainer, a function returning one"):
        plan_layout(lambda: config, world_size=8)  # type: ignore[arg-type, return-value]


# Large layouts: Llama 3 shapes on 64 and 1024 ranks, set up on meta only.

BF16_AC = {"param_dtype": "bfloat16", "reduce_dtype": "float32", "checkpoint_activations": True}


def llama(model: str, params: DeviceParameters, root: str, batch: int = 1) -> Llama3Trainer:
    config = Llama3Config(
        model=model,
        seq_len=8192,
        batch_size=batch,
        run_dir=root,
        device_parameters=params,
        logging_parameters={"backends": []},
    )
    return Llama3Trainer(config)


def test_llama_8b_on_64_ranks_with_fsdp(root: str) -> None:
    trainer = llama("8B", DeviceParameters.FSDP(**BF16_AC), root)
    plan = plan_layout(trainer, world_size=64, devices_per_node=8, device_memory="80GiB")
    assert plan.fits and len(plan.groups) == 1 and plan.worst.ranks == tuple(range(64))
    memory = plan.worst.memory
    # 8.03B fp32 parameters, each padded shard about 1/64 of them; AdamW keeps two more.
    assert 8.0e9 * 4 / 64 < memory.parameters < 8.1e9 * 4 / 64
    assert memory.gradients == memory.parameters
    assert 1.99 < memory.optimizer / memory.parameters <= 2
    assert plan.verdict().startswith("fits: ")
    text = plan.describe()
    for expected in ("world: 64 ranks = 8 nodes x 8 devices of 80.0 GiB", "AdamW", "fits"):
        assert expected in text


def test_llama_70b_on_1024_ranks_in_five_dimensions(root: str) -> None:
    params = DeviceParameters(
        pipeline_parallel=4,
        dp_replicate=2,
        dp_shard=8,
        context_parallel=2,
        tensor_parallel=8,
        pipeline_parallel_config={"num_microbatches": 8},
        **BF16_AC,
    )
    plan = plan_layout(llama("70B", params, root, batch=8), world_size=1024, device_memory="80GiB")
    assert sorted(r for g in plan.groups for r in g.ranks) == list(range(1024))
    assert {g.pp_rank for g in plan.groups} == {0, 1, 2, 3}
    assert plan.layout.shape == (4, 2, 8, 2, 8) and plan.fits
    assert plan.seconds < 60
    # The last stage holds the output projection and the loss: the most activations.
    assert plan.worst.pp_rank == 3
