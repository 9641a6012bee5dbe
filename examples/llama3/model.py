"""Llama 3 transformer written so FSDP, tensor/sequence parallelism and pipeline stages all apply.

Layout: ``tok_embeddings`` (None on pipeline stages without the embedding), ``layers`` (an
``nn.ModuleDict`` keyed "0".."n-1", so a stage keeps its layers' global names), ``norm`` and
``output`` (None on non-last stages). Build on the meta device, materialize with ``to_empty`` and
call :meth:`Transformer.init_weights`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ParallelStyle

from dream_trainer.parallel import (
    StyleConstructor,
    colwise_parallel,
    context_parallel_attention,
    fill_blockwise_,
    global_sequence_length,
    prepare_module_input,
    rowwise_parallel,
    sequence_parallel,
    sequence_positions,
)
from dream_trainer.parallel.sharded_init import Fill
from examples.llama3.configs import LlamaArgs, RopeScaling

_INIT_STD = 0.02


def scale_rope_frequencies(freqs: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1 frequency scaling: keep high frequencies, divide low ones, blend in between."""
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * freqs / scaling.scale_factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scaling.scale_factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def rope_table(args: LlamaArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """Complex rotations ``exp(i * pos * freq)`` of shape (max_seq_len, head_dim // 2)."""
    half = args.head_dim // 2
    exponents = torch.arange(0, half, device=device, dtype=torch.float64) * 2 / args.head_dim
    freqs = 1.0 / (args.rope_theta**exponents)
    if args.rope_scaling is not None:
        freqs = scale_rope_frequencies(freqs, args.rope_scaling)
    positions = torch.arange(args.max_seq_len, device=device, dtype=torch.float64)
    angles = torch.outer(positions, freqs).float()
    # complex64 on purpose: mixed-precision casts of forward inputs skip complex tensors, so the
    # table stays fp32-accurate when passed to FSDP-wrapped blocks.
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` (batch, seq, heads, head_dim) by ``rope[positions]``.

    ``positions`` are the tokens' places in the whole sequence: under context parallelism a
    rank's tokens are not ``0..seq-1`` (see ``sequence_positions``).
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotated = pairs * rope[positions].view(1, x.shape[1], 1, -1)
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, scaled by a learned weight."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    """Causal grouped-query attention; head counts come from the (possibly TP-sharded) weights."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        kv_dim = args.n_kv_heads * args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, kv_dim, bias=False)
        self.wv = nn.Linear(args.dim, kv_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        bsz, seqlen = x.shape[0], x.shape[1]
        length = global_sequence_length(seqlen)  # a host int: no device sync, no graph break
        if length > rope.shape[0]:
            raise ValueError(
                f"Sequence length {length} exceeds max_seq_len {rope.shape[0]}; "
                "raise max_seq_len in the model config or feed shorter sequences."
            )
        positions = sequence_positions(seqlen, device=x.device)
        # -1 resolves to the local head count, so the same code runs with colwise-sharded wq/wk/wv.
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        q, k = apply_rope(q, rope, positions), apply_rope(k, rope, positions)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        # SDPA, or under context parallelism attention over the whole split sequence.
        out = context_parallel_attention(q, k, v, is_causal=True, document_ids=document_ids)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm attention and feed-forward with residuals; one FSDP unit and one TP plan."""

    def __init__(self, layer_id: int, args: LlamaArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_layers = args.n_layers
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, document_ids=document_ids)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self, seed: int) -> None:
        """Truncated normal(0.02) inputs, depth-scaled std for the residual outputs, unit norms.

        Layout-invariant (see :func:`~dream_trainer.parallel.fill_blockwise_`): each weight's
        values come from ``seed`` and its name in the full model.
        """
        out_std = _INIT_STD / math.sqrt(2 * self.n_layers)
        prefix = f"layers.{self.layer_id}"
        for name, std in (
            ("attention.wq", _INIT_STD),
            ("attention.wk", _INIT_STD),
            ("attention.wv", _INIT_STD),
            ("attention.wo", out_std),
            ("feed_forward.w1", _INIT_STD),
            ("feed_forward.w3", _INIT_STD),
            ("feed_forward.w2", out_std),
        ):
            weight = self.get_submodule(name).weight
            fill_blockwise_(weight, _trunc_normal(std), seed=seed, key=f"{prefix}.{name}.weight")
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()

    def fully_shard(self, config: dict[str, Any]) -> None:
        fully_shard(self, **config)

    def parallelize_plan(self, loss_parallel: bool) -> dict[str, StyleConstructor]:
        """Megatron-style TP with sequence parallel norms (activations Shard(1) between blocks)."""
        return {
            "attention_norm": sequence_parallel(),
            "attention": prepare_module_input(
                input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)
            ),
            "attention.wq": colwise_parallel(),
            "attention.wk": colwise_parallel(),
            "attention.wv": colwise_parallel(),
            "attention.wo": rowwise_parallel(output_layouts=Shard(1)),
            "ffn_norm": sequence_parallel(),
            "feed_forward": prepare_module_input(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            ),
            "feed_forward.w1": colwise_parallel(),
            "feed_forward.w2": rowwise_parallel(output_layouts=Shard(1)),
            "feed_forward.w3": colwise_parallel(),
        }


def _trunc_normal(std: float) -> Fill:
    return lambda t, g: nn.init.trunc_normal_(t, 0.0, std, -3 * std, 3 * std, generator=g)


def _normal(std: float) -> Fill:
    return lambda t, g: nn.init.normal_(t, 0.0, std, generator=g)


class Transformer(nn.Module):
    """Llama 3 decoder, or one pipeline stage of it.

    ``layer_ids`` picks which of the ``args.n_layers`` blocks this instance holds (default: all);
    ``embeddings``/``output`` say whether it holds the token embedding and the final norm + output
    projection. Forward takes token ids (batch, seq) when the embedding is present, else hidden
    states (batch, seq, dim); it returns logits when the output is present, else hidden states.
    """

    rope: torch.Tensor

    def __init__(
        self,
        args: LlamaArgs,
        *,
        layer_ids: Iterable[int] | None = None,
        embeddings: bool = True,
        output: bool = True,
    ) -> None:
        super().__init__()
        self.args = args
        ids = range(args.n_layers) if layer_ids is None else sorted(set(layer_ids))
        bad = [i for i in ids if not 0 <= i < args.n_layers]
        if bad:
            raise ValueError(
                f"layer_ids {bad} are outside the model's {args.n_layers} layers; "
                f"pass ids in 0..{args.n_layers - 1}."
            )
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim) if embeddings else None
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in ids})
        self.norm = RMSNorm(args.dim, args.norm_eps) if output else None
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False) if output else None
        self._tie_embeddings()
        self.register_buffer("rope", rope_table(args), persistent=False)

    def _tie_embeddings(self) -> None:
        # Tying needs both ends on this module; a pipeline stage holding only one end keeps its
        # own copy (initialized to the same values, but trained separately).
        if self.args.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def _apply(self, fn: Any, recurse: bool = True) -> Transformer:
        # Module._apply (to_empty, to, cuda) replaces parameters one module at a time when moving
        # off the meta device, which unties shared weights; tie them again afterwards.
        super()._apply(fn, recurse)
        self._tie_embeddings()
        if not self.rope.is_complex():
            # Module.to(dtype) casts complex buffers to real, dropping the sines; rebuild it.
            self.rope = rope_table(self.args, device=self.rope.device)
        return self

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token of the whole model (every stage's, even on a pipeline stage)
        at ``seq_len`` (default ``max_seq_len``): see :func:`flops_per_token` for the definition.
        The trainer's throughput metrics call it with no argument."""
        return flops_per_token(self.args, self.args.max_seq_len if seq_len is None else seq_len)

    @property
    def is_tied(self) -> bool:
        """Whether the output projection shares its weight with the token embedding."""
        return (
            self.tok_embeddings is not None
            and self.output is not None
            and self.output.weight is self.tok_embeddings.weight
        )

    def forward(self, x: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (or hidden states on a pipeline stage without the head) of token ids ``x``.

        ``document_ids`` (batch, seq) makes attention document-causal for packed sequences.
        """
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        for layer in self.layers.values():
            h = layer(h, self.rope, document_ids=document_ids)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None:
            h = self.output(h)
        return h

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        """Initialize every parameter and the rope buffer, deterministically from the global RNG.

        One base seed is drawn from torch's global RNG; every weight's values then follow from
        it and the weight's name in the full model (:func:`~dream_trainer.parallel.fill_blockwise_`),
        so a pipeline stage, an FSDP or tensor-parallel shard (DTensor parameters, initialized
        in place, each rank generating only its own rows) and the unsharded model all get the
        same values.
        """
        base = int(torch.randint(0, 2**62, (1,)).item())
        device = self.rope.device if buffer_device is None else torch.device(buffer_device)
        self.rope = rope_table(self.args, device=device)
        embedding = "tok_embeddings.weight"
        if self.tok_embeddings is not None:
            fill_blockwise_(
                self.tok_embeddings.weight, _normal(_INIT_STD), seed=base, key=embedding
            )
        for layer in self.layers.values():
            assert isinstance(layer, TransformerBlock)
            layer.init_weights(base)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None and not self.is_tied:
            weight = self.output.weight
            if self.args.tie_embeddings:  # pipeline stage without the embedding: same values
                fill_blockwise_(weight, _normal(_INIT_STD), seed=base, key=embedding)
            else:
                std = self.args.dim**-0.5
                fill_blockwise_(weight, _trunc_normal(std), seed=base, key="output.weight")

    def fully_shard(self, config: dict[str, Any]) -> None:
        """Shard embedding and norm+output as their own units (tied ends stay in the root)."""
        if not self.is_tied:
            if self.tok_embeddings is not None:
                fully_shard(self.tok_embeddings, **config)
            if self.output is not None and self.norm is not None:
                # Backward needs these right after forward, so keep them gathered in between.
                fully_shard([self.norm, self.output], **{**config, "reshard_after_forward": False})
        fully_shard(self, **config)

    def parallelize_plan(self, loss_parallel: bool) -> dict[str, StyleConstructor]:
        """Vocab-sharded embedding and output; logits are a Shard(-1) DTensor under loss parallel."""
        plan: dict[str, StyleConstructor] = {}
        if self.tok_embeddings is not None:
            plan["tok_embeddings"] = rowwise_parallel(
                input_layouts=Replicate(), output_layouts=Shard(1)
            )
        if self.norm is not None:
            plan["norm"] = sequence_parallel()
        if self.output is not None:
            output_style = colwise_parallel(
                input_layouts=Shard(1),
                output_layouts=Shard(-1) if loss_parallel else Replicate(),
                use_local_output=not loss_parallel,
            )
            if self.is_tied:
                output_style = _retie(output_style, self)
            plan["output"] = output_style
        return plan


def _retie(make_style: StyleConstructor, model: Transformer) -> StyleConstructor:
    """Wrap the output's style so it re-shares the (already distributed) embedding weight.

    Embedding rowwise and output colwise both shard the (vocab, dim) weight as Shard(0), but
    torch's styles each replace the module's parameter with a new one; re-pointing output.weight
    keeps a single parameter for the optimizer. Relies on the plan applying tok_embeddings first.
    """
    embedding = model.tok_embeddings
    assert embedding is not None

    def build(module: Any) -> ParallelStyle:
        inner = make_style(module)
        assert isinstance(inner, ParallelStyle)
        return _TiedOutput(inner, embedding)

    return build


class _TiedOutput(ParallelStyle):
    """Apply ``inner`` to the output projection, then point its weight at the embedding's."""

    def __init__(self, inner: ParallelStyle, embedding: nn.Embedding) -> None:
        self.inner, self.embedding = inner, embedding

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        self.inner.src_data_rank = self.src_data_rank
        result = self.inner._apply(module, device_mesh)
        module.weight = self.embedding.weight
        return result


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters())


def matmul_parameters(args: LlamaArgs) -> int:
    """Weights that multiply activations, per token: every block's projections and the output.

    The token embedding is a lookup (no FLOPs), so it is left out, unless the output projection
    is tied to it, where that one matrix still counts once, as the output's matmul.
    """
    attention = args.dim * (2 * args.n_heads + 2 * args.n_kv_heads) * args.head_dim  # q, o, k, v
    feed_forward = 3 * args.dim * args.ffn_hidden_dim  # w1, w2, w3
    return args.n_layers * (attention + feed_forward) + args.dim * args.vocab_size


def flops_per_token(args: LlamaArgs, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token of a ``seq_len`` sequence; a multiply-add is 2.

    ``6 N + 12 L H d S``, with N = :func:`matmul_parameters`, L layers, H query heads of size d
    and S = ``seq_len``:

    * ``6 N``: each matmul weight costs 2 FLOPs per token forward and 4 backward (the gradients
      of its input and of itself);
    * ``12 L H d S``: per layer and token, ``q @ k.T`` and ``scores @ v`` cost ``2 H d S`` each
      forward, and twice that backward. S is the full sequence: as in PaLM (appendix B) and
      torchtitan, the causal mask is not discounted, so MFU compares with their numbers;
      a causal kernel skips about half of this term.

    Not counted: norms, RoPE, softmax, SiLU, the loss and the optimizer (elementwise work), and
    the embedding lookup and its gradient (an index-add). Activation recomputation is not
    counted either: this is *model* FLOPs, the work the model needs, not what the hardware did.
    ``torch.utils.flop_counter.FlopCounterMode`` counts the same matmuls exactly when attention
    runs on the math SDPA backend (``tests/test_llama3_flops.py``); on fused kernels it counts
    their backward as 2.5x the forward (the recomputed scores), and on CPU flash none of it.
    """
    attention = 12 * args.n_layers * args.n_heads * args.head_dim * seq_len
    return 6 * matmul_parameters(args) + attention
