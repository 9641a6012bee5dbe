"""Tests of the Llama 3 example model: shapes, parameter counts, RoPE, GQA, init, pipeline, TP."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import ValidationError
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel as loss_parallel_ctx

from dream_trainer.parallel import apply_fully_shard, apply_tensor_parallel
from examples.llama3.configs import MODEL_NAMES, LlamaArgs, RopeScaling, get_model_args
from examples.llama3.model import (
    Attention,
    Transformer,
    apply_rope,
    count_parameters,
    rope_table,
    scale_rope_frequencies,
)
from tests.multirank import run_on_ranks

# Published totals (Meta's model cards / HF safetensors); 1B and 3B count the tied weight once.
PUBLISHED = {
    "1B": 1_235_814_400,
    "3B": 3_212_749_824,
    "8B": 8_030_261_248,
    "70B": 70_553_706_496,
    "405B": 405_853_388_800,
}


def tiny_args(**overrides: Any) -> LlamaArgs:
    base: dict[str, Any] = dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=32
    )
    return LlamaArgs(**{**base, **overrides})


def build(args: LlamaArgs, seed: int = 0, **kwargs: Any) -> Transformer:
    """Meta-device build, materialized on CPU and initialized from ``seed``."""
    with torch.device("meta"):
        model = Transformer(args, **kwargs)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_count_matches_published(name: str) -> None:
    with torch.device("meta"):
        model = Transformer(get_model_args(name))
    assert count_parameters(model) == PUBLISHED[name]


def test_config_names_and_errors() -> None:
    assert set(MODEL_NAMES) == {"debug", *PUBLISHED}
    assert get_model_args("8B").ffn_hidden_dim == 14336
    assert get_model_args("debug", max_seq_len=512).max_seq_len == 512
    with pytest.raises(ValueError, match="choose one of debug, 1B"):
        get_model_args("7B")
    with pytest.raises(ValidationError, match="n_kv_heads"):
        tiny_args(n_kv_heads=3)
    with pytest.raises(ValidationError, match="extra"):
        LlamaArgs.model_validate({**tiny_args().model_dump(), "n_head": 4})


def test_debug_forward_shapes() -> None:
    args = get_model_args("debug")
    model = build(args)
    assert count_parameters(model) == 4_000_000
    tokens = torch.randint(0, args.vocab_size, (2, 64))
    assert model(tokens).shape == (2, 64, args.vocab_size)
    with pytest.raises(ValueError, match="exceeds max_seq_len 256"):
        model(torch.zeros(1, 257, dtype=torch.long))


def test_rope_scaling_matches_formula() -> None:
    scaling = RopeScaling(scale_factor=8, low_freq_factor=1, high_freq_factor=4)
    freqs = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    got = scale_rope_frequencies(freqs, scaling)
    for f, g in zip(freqs.tolist(), got.tolist()):
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            want = f
        elif wavelen > 8192 / 1:
            want = f / 8
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            want = (1 - smooth) * f / 8 + smooth * f
        assert g == pytest.approx(want, rel=1e-12)
    assert (got < freqs).any() and (got == freqs).any()


def test_rope_rotates_adjacent_pairs() -> None:
    args = tiny_args(rope_theta=10000.0)
    rope = rope_table(args)
    x = torch.randn(1, 5, 3, args.head_dim)
    out = apply_rope(x, rope, torch.arange(5))
    for pos in range(5):
        for i in range(args.head_dim // 2):
            angle = pos * 10000.0 ** (-2 * i / args.head_dim)
            a, b = x[0, pos, :, 2 * i], x[0, pos, :, 2 * i + 1]
            cos, sin = math.cos(angle), math.sin(angle)
            torch.testing.assert_close(out[0, pos, :, 2 * i], a * cos - b * sin)
            torch.testing.assert_close(out[0, pos, :, 2 * i + 1], a * sin + b * cos)


def test_gqa_attention_matches_naive() -> None:
    args = tiny_args(n_heads=8, n_kv_heads=2)
    torch.manual_seed(1)
    attn = Attention(args)
    rope = rope_table(args)
    x = torch.randn(2, 7, args.dim)
    b, s, hd = 2, 7, args.head_dim
    positions = torch.arange(s)
    q = apply_rope(attn.wq(x).view(b, s, 8, hd), rope, positions)
    k = apply_rope(attn.wk(x).view(b, s, 2, hd), rope, positions)
    v = attn.wv(x).view(b, s, 2, hd)
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    heads = []
    for h in range(8):
        kv = h // 4  # query head h reads kv head h // (n_heads / n_kv_heads)
        scores = q[:, :, h] @ k[:, :, kv].transpose(-1, -2) / math.sqrt(hd)
        heads.append(scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v[:, :, kv])
    want = attn.wo(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attn(x, rope), want, atol=1e-5, rtol=1e-5)


def test_init_weights_after_to_empty_is_deterministic() -> None:
    args = tiny_args()
    a, b, c = build(args, seed=3), build(args, seed=3), build(args, seed=4)
    for (name, pa), pb, pc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values()
    ):
        assert torch.isfinite(pa).all(), name
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name
    state = a.state_dict()
    assert torch.equal(state["layers.0.ffn_norm.weight"], torch.ones(args.dim))
    torch.testing.assert_close(a.rope, rope_table(args))
    std = state["layers.1.attention.wq.weight"].std().item()
    assert 0.015 < std < 0.025


def test_tied_embeddings_share_storage() -> None:
    model = build(tiny_args(tie_embeddings=True))
    assert model.is_tied
    assert model.output is not None and model.tok_embeddings is not None
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    bf16 = model.to(torch.bfloat16)  # .to(dtype) keeps the tie and the complex rope table
    assert bf16.is_tied and bf16.rope.dtype == torch.complex64
    torch.testing.assert_close(bf16.rope, rope_table(tiny_args()))
    untied = build(tiny_args())
    assert count_parameters(untied) - count_parameters(model) == 128 * 64


@pytest.mark.parametrize("tie", [False, True])
def test_pipeline_stages_match_full_model(tie: bool) -> None:
    args = tiny_args(n_layers=4, tie_embeddings=tie)
    full = build(args, seed=5)
    first = build(args, seed=5, layer_ids=[0, 1], output=False)
    last = build(args, seed=5, layer_ids=[2, 3], embeddings=False)
    assert list(last.layers) == ["2", "3"] and first.norm is None and last.tok_embeddings is None
    assert not last.is_tied  # a stage with one end keeps its own copy
    # Each stage's weights equal the matching part of the full model (layout-invariant init).
    full_state = full.state_dict()
    for stage in (first, last):
        for name, value in stage.state_dict().items():
            ref = full_state["tok_embeddings.weight" if tie and name == "output.weight" else name]
            assert torch.equal(value, ref), name
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    hidden = first(tokens)
    assert hidden.shape == (2, 16, args.dim)
    torch.testing.assert_close(last(hidden), full(tokens))


def test_overfits_one_batch() -> None:
    args = tiny_args()
    model = build(args, seed=0)
    tokens = torch.randint(0, args.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ------------------------------------------------------------------------- multi-rank


def _tp_matches_unsharded(tie: bool) -> dict[str, float]:
    """TP 2 + sequence parallel + loss parallel vs the unsharded model on the same weights."""
    args = tiny_args(tie_embeddings=tie)
    ref = build(args, seed=7)
    model = build(args, seed=7)
    tokens = torch.randint(0, args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    ref_logits = ref(inputs)
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten())
    ref_loss.backward()

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    apply_tensor_parallel(model, mesh["tp"], loss_parallel=True)
    assert model.is_tied == tie
    logits = model(inputs)
    assert isinstance(logits, DTensor)
    with loss_parallel_ctx():
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
    errors = {"logits": (logits.full_tensor() - ref_logits).abs().max().item()}
    assert isinstance(loss, DTensor)
    errors["loss"] = abs(loss.full_tensor().item() - ref_loss.item())
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        grad, ref_grad = p.grad, ref_params[name].grad
        assert isinstance(grad, DTensor) and ref_grad is not None, name
        errors[f"grad:{name}"] = (grad.full_tensor() - ref_grad).abs().max().item()
    return errors


@pytest.mark.multirank
@pytest.mark.parametrize("tie", [False, True])
def test_tensor_parallel_matches_unsharded(tie: bool) -> None:
    for errors in run_on_ranks(_tp_matches_unsharded, 2, tie):
        assert max(errors.values()) < 1e-5, errors


def _fsdp_matches_unsharded(tie: bool) -> float:
    args = tiny_args(tie_embeddings=tie)
    ref, model = build(args, seed=9), build(args, seed=9)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp_shard",))
    apply_fully_shard(model, {"mesh": mesh})
    assert model.is_tied == tie
    with torch.no_grad():  # wipe the shards, then initialize them in place (DTensors)
        for param in model.parameters():
            param.zero_()
    torch.manual_seed(9)
    model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    return (model(tokens) - ref(tokens)).abs().max().item()


@pytest.mark.multirank
@pytest.mark.parametrize("tie", [False, True])
def test_fully_shard_matches_unsharded(tie: bool) -> None:
    assert max(run_on_ranks(_fsdp_matches_unsharded, 2, tie)) < 1e-5
