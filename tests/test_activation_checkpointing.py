"""Selective and full activation checkpointing: same numerics as none, memory none > selective >
full, and selective recomputes no matmul (backward FLOPs equal to no checkpointing)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dream_trainer.configs import ActivationCheckpointConfig, DeviceParameters
from dream_trainer.parallel.activation_checkpointing import SAVED_OPS, checkpoint_blocks, saved_ops
from examples.llama3.configs import LlamaArgs
from examples.llama3.model import Transformer
from tests.live_bytes import LiveBytes

ARGS = LlamaArgs(
    dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64
)


def _model(mode: str | None, every_n_blocks: int = 1) -> Transformer:
    with torch.device("meta"):
        model = Transformer(ARGS)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    if mode is not None:
        checkpoint_blocks(list(model.layers.values()), mode, every_n_blocks)  # type: ignore[arg-type]
    return model


def _run(mode: str | None) -> dict[str, Any]:
    """Loss, gradients, bytes kept alive by the forward, and backward FLOPs."""
    model = _model(mode)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    with LiveBytes() as tracker:
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        kept = tracker.live
    counter = FlopCounterMode(display=False)
    with counter:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "grads": grads, "kept": kept, "flops": counter.get_total_flops()}


@pytest.fixture(scope="module")
def runs() -> dict[str, dict[str, Any]]:
    return {str(mode): _run(mode) for mode in (None, "selective", "full")}


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointing_keeps_losses_and_gradients(runs, mode) -> None:
    plain, checkpointed = runs["None"], runs[mode]
    assert torch.equal(checkpointed["loss"], plain["loss"])
    assert checkpointed["grads"].keys() == plain["grads"].keys()
    for name, grad in checkpointed["grads"].items():
        torch.testing.assert_close(grad, plain["grads"][name], rtol=1e-6, atol=0, msg=name)


def test_selective_keeps_less_than_none_and_recomputes_no_matmul(runs) -> None:
    none, selective, full = (runs[m] for m in ("None", "selective", "full"))
    assert none["kept"] > selective["kept"] > full["kept"], [
        r["kept"] for r in (none, selective, full)
    ]
    # Full reruns every block's forward matmuls in backward; selective reads them back.
    assert selective["flops"] == none["flops"] < full["flops"]


def test_every_n_blocks_checkpoints_every_nth_block() -> None:
    model = _model(None)
    blocks = list(model.layers.values())
    assert checkpoint_blocks(blocks, "selective", every_n_blocks=3) == [blocks[0], blocks[3]]


def test_saved_ops_are_found_in_this_torch() -> None:
    found = {str(op) for op in saved_ops()}
    assert {"aten.mm.default", "aten.addmm.default"} <= found
    assert found <= set(SAVED_OPS)


def test_bad_values_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"activation_checkpoint_config.mode must be 'full' or"):
        checkpoint_blocks([], "partial")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"activation_checkpoint_config.every_n_blocks must be"):
        checkpoint_blocks([], "full", every_n_blocks=0)
    with pytest.raises(ValueError, match=r"activation_checkpoint_config.mode\n.*'full' or 'sel"):
        DeviceParameters(checkpoint_activations=True, activation_checkpoint_config={"mode": "x"})
    with pytest.raises(ValueError, match="but checkpoint_activations=False, so it would have no"):
        DeviceParameters(activation_checkpoint_config=ActivationCheckpointConfig(mode="selective"))
    assert DeviceParameters.FSDP(
        checkpoint_activations=True, activation_checkpoint_config={"mode": "selective"}
    ).activation_checkpoint_config == ActivationCheckpointConfig(mode="selective")
