"""Layout-invariant initialization: ``fill_blockwise_`` and Llama 3's sharded init.

The Llama 3 debug model is set up by the trainer with ``weight_init="sharded"`` under FSDP 2,
TP 2, PP 2 and FSDP 2 x TP 2, and every weight must equal, bit for bit, the one-process init
from the same seed. Under FSDP 4 the sharded init must never hold a full copy: the peak of
live bytes during setup stays near a quarter of the model, while ``weight_init="full"``
allocates the whole model first.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DeviceMesh, DTensor, Partial

from dream_trainer.configs import DeviceParameters, TrainingParameters
from dream_trainer.parallel import block_seed, fill_blockwise_
from dream_trainer.parallel.materialize import canonical_name
from dream_trainer.parallel.sharded_init import BLOCK_ELEMENTS
from dream_trainer.trainer import Callback
from examples.llama3.configs import get_model_args
from examples.llama3.model import Transformer
from examples.llama3.presets import SHARDED_INIT_PRESETS, preset
from examples.llama3.train import Llama3Config, Llama3Trainer
from tests.live_bytes import LiveBytes
from tests.multirank import run_on_ranks

SEED = 5


def _normal(block: torch.Tensor, generator: torch.Generator) -> None:
    block.normal_(generator=generator)


def test_a_plain_tensor_is_filled_block_by_block_from_seeded_generators() -> None:
    tensor = torch.empty(5, 3)
    fill_blockwise_(tensor, _normal, seed=1, key="w", block_elements=6)  # 2 rows per block
    blocks = []
    for block, rows in enumerate((2, 2, 1)):
        generator = torch.Generator().manual_seed(block_seed(1, "w", block))
        blocks.append(torch.empty(rows, 3).normal_(generator=generator))
    assert torch.equal(tensor, torch.cat(blocks))
    assert not torch.equal(tensor, fill_blockwise_(torch.empty(5, 3), _normal, seed=1, key="v"))
    assert not torch.equal(tensor, fill_blockwise_(torch.empty(5, 3), _normal, seed=2, key="w"))


def test_blocks_hold_about_block_elements_values() -> None:
    tensor = fill_blockwise_(torch.empty(3, BLOCK_ELEMENTS // 2), _normal, seed=0, key="w")
    generator = torch.Generator().manual_seed(block_seed(0, "w", 1))  # rows 2.. are block 1
    assert torch.equal(tensor[2:], torch.empty(1, BLOCK_ELEMENTS // 2).normal_(generator=generator))


def test_values_are_drawn_in_float32_then_cast() -> None:
    full = fill_blockwise_(torch.empty(4, 8), _normal, seed=3, key="w", generator_device="cpu")
    half = fill_blockwise_(torch.empty(4, 8, dtype=torch.bfloat16), _normal, seed=3, key="w")
    assert torch.equal(half, full.bfloat16())
    scalar = fill_blockwise_(torch.empty(()), _normal, seed=3, key="s")
    assert scalar.shape == () and torch.isfinite(scalar)


def test_a_block_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="block_elements must be a positive count, got 0"):
        fill_blockwise_(torch.empty(2), _normal, seed=0, key="w", block_elements=0)


def test_large_presets_initialize_sharded() -> None:
    assert SHARDED_INIT_PRESETS == ("70B", "405B")
    for name in ("debug", "8B", *SHARDED_INIT_PRESETS):
        expected = "sharded" if name in SHARDED_INIT_PRESETS else "full"
        assert preset(name, Llama3Config).weight_init == expected, name


# ------------------------------------------------------------------------- multi-rank


class _Tokenizer:
    vocab_size = get_model_args("debug").vocab_size


class InitOnlyTrainer(Llama3Trainer):
    """The Llama 3 trainer without data: setup (counted by LiveBytes) is all that runs."""

    @property
    def tokenizer(self) -> Any:
        return _Tokenizer()

    def configure_dataloaders(self) -> tuple[Any, Any]:
        return [], None

    count_bytes = False

    def setup(self) -> None:
        if not self.count_bytes:  # dispatch-mode tracking slows setup down
            return super().setup()
        with LiveBytes() as tracker:
            super().setup()
        self.setup_bytes = {"peak": tracker.peak, "largest": tracker.largest}


class StopAfterSetup(Callback[InitOnlyTrainer]):
    def post_setup(self) -> None:
        self.trainer.request_stop("only the initialization is tested")


@functools.cache
def one_process_init() -> dict[str, torch.Tensor]:
    """The debug model initialized from SEED in this process, as plain tensors."""
    with torch.device("meta"):
        model = Transformer(get_model_args("debug", max_seq_len=32))
    model.to_empty(device="cpu")
    torch.manual_seed(SEED)
    model.init_weights()
    return {name: p.detach() for name, p in model.named_parameters()}


def _set_up(
    params: DeviceParameters, weight_init: str, count_bytes: bool = False
) -> InitOnlyTrainer:
    config = Llama3Config(
        seed=SEED,
        model="debug",
        seq_len=32,
        batch_size=2,
        weight_init=weight_init,
        device_parameters=params,
        training_parameters=TrainingParameters(max_steps=1),
        logging_parameters={"backends": [], "performance_metrics": False},
    )
    trainer = InitOnlyTrainer(config, callbacks=[StopAfterSetup()])
    trainer.count_bytes = count_bytes
    trainer.fit()
    return trainer


def _differences(trainer: InitOnlyTrainer, reference: dict[str, torch.Tensor]) -> list[str]:
    """Names of this rank's weights that differ from the one-process init (none missing)."""
    seen, differ = set(), []
    for parts in trainer.model_parts().values():
        for part in parts:
            for name, param in part.named_parameters():
                name = canonical_name(name)
                value = param.full_tensor() if isinstance(param, DTensor) else param
                seen.add(name)
                if not torch.equal(value.detach(), reference[name]):
                    differ.append(name)
    assert seen, "this rank holds no parameters"
    return differ


LAYOUTS: dict[int, dict[str, DeviceParameters]] = {
    2: {
        "fsdp2": DeviceParameters.FSDP(),
        "tp2": DeviceParameters.FSDP(dp_shard=1, tensor_parallel=2),
        "pp2": DeviceParameters(
            pipeline_parallel=2, dp_shard=1, pipeline_parallel_config={"num_microbatches": 2}
        ),
    },
    4: {"fsdp2_tp2": DeviceParameters.FSDP(dp_shard=2, tensor_parallel=2)},
}


def _sharded_init_differences(
    world_size: int, reference: dict[str, torch.Tensor]
) -> dict[str, list[str]]:
    return {
        layout: _differences(_set_up(params, "sharded"), reference)
        for layout, params in LAYOUTS[world_size].items()
    }


@pytest.mark.multirank
@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_init_gives_the_one_process_weights(world_size: int) -> None:
    for rank, differences in enumerate(
        run_on_ranks(_sharded_init_differences, world_size, world_size, one_process_init())
    ):
        assert differences == {layout: [] for layout in LAYOUTS[world_size]}, f"rank {rank}"


def _setup_bytes_under_fsdp4(reference: dict[str, torch.Tensor]) -> dict[str, Any]:
    sharded = _set_up(DeviceParameters.FSDP(), "sharded", count_bytes=True)
    full = _set_up(DeviceParameters.FSDP(), "full", count_bytes=True)
    return {
        "sharded": sharded.setup_bytes,
        "full": full.setup_bytes,
        "differ": _differences(sharded, reference) + _differences(full, reference),
        "model_bytes": sum(p.nbytes for p in reference.values()),
        "largest_param_bytes": max(p.nbytes for p in reference.values()),
    }


@pytest.mark.multirank
def test_sharded_init_never_holds_a_full_copy() -> None:
    for result in run_on_ranks(_setup_bytes_under_fsdp4, 4, one_process_init()):
        assert result["differ"] == []
        model = result["model_bytes"]
        # The full path materializes the whole model on every rank before sharding it.
        assert result["full"]["peak"] > model + model / 4
        # Sharded: this rank's quarter, plus transients (a block being generated, FSDP copying
        # a shard into its padded storage) well under an eighth of the model.
        assert result["sharded"]["peak"] < model / 4 + model / 8, result
        # No allocation the size of a whole parameter: blocks and shards only.
        assert result["sharded"]["largest"] <= result["largest_param_bytes"] / 4, result
        assert result["full"]["largest"] == result["largest_param_bytes"]


def _partial_is_refused() -> str:
    import torch.distributed as dist

    mesh = DeviceMesh("cpu", list(range(dist.get_world_size())))
    pending = DTensor.from_local(torch.zeros(2, 2), mesh, [Partial()])
    with pytest.raises(ValueError, match=r"placement P\(sum\) is a pending reduction") as info:
        fill_blockwise_(pending, _normal, seed=0, key="grad")
    return str(info.value)


@pytest.mark.multirank
def test_a_pending_reduction_is_refused() -> None:
    (message,) = set(run_on_ranks(_partial_is_refused, 2))
    assert "'grad'" in message
