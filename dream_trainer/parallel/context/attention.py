"""Attention that models call instead of ``scaled_dot_product_attention``; context-parallel aware.

Without context parallelism it is SDPA with the requested mask. Under it, each rank holds some
chunks of every sequence (see :mod:`~dream_trainer.parallel.context.layout`) and needs the keys
and values of all of them:

* ``allgather``: keys and values are all-gathered over the cp group once per call (the backward
  reduce-scatters their gradients); local queries attend to the whole sequence with a mask built
  from global positions.
* ``alltoall``: keys and values travel around the cp ring one block per step (each rank sends
  its block to the next and receives the previous rank's, point to point); each step attends to
  one block and the partial results are merged with their log-sum-exp, so a rank holds one
  remote block at a time in forward.

Masks: causal (by global position), none, and document-causal for packed sequences
(``document_ids``: tokens attend only to earlier tokens of their own document). Anything else
(an arbitrary ``attn_mask``, a sliding window, dropout) cannot be split this way and is refused
under context parallelism, never replaced.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dream_trainer.parallel.context.layout import ContextLayout, active_layout

__all__ = ["context_parallel_attention"]


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool = True,
    document_ids: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    window_size: int | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of ``q`` (batch, heads, seq, dim) over ``k``, ``v`` (batch, kv_heads, seq, dim).

    ``kv_heads`` may divide ``heads`` (grouped-query attention). ``document_ids`` (batch, seq)
    makes the mask document-causal (with ``is_causal``) or block-diagonal (without). Under
    context parallelism ``seq`` is this rank's share and ``document_ids`` its share too.
    """
    layout = active_layout()
    if layout is None or layout.size == 1:
        if layout is not None:
            layout.attention_calls += 1
        return _local_attention(
            q, k, v, is_causal, document_ids, attn_mask, window_size, dropout_p, scale
        )
    _refuse_unsplittable(attn_mask, window_size, dropout_p, layout)
    layout.attention_calls += 1
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if layout.rotate_method == "allgather":
        return _allgather_attention(q, k, v, layout, is_causal, document_ids, scale)
    return _ring_attention(q, k, v, layout, is_causal, document_ids, scale)


def _refuse_unsplittable(
    attn_mask: torch.Tensor | None, window_size: int | None, dropout_p: float, layout: ContextLayout
) -> None:
    what = None
    if attn_mask is not None:
        what = "attn_mask (an arbitrary mask tensor)"
    elif window_size is not None:
        what = f"window_size={window_size} (a sliding-window mask)"
    elif dropout_p:
        what = f"dropout_p={dropout_p} (attention dropout)"
    if what is not None:
        raise ValueError(
            f"context_parallel_attention cannot split {what} over context_parallel={layout.size} "
            "ranks; it supports causal, non-causal and document-causal masks (document_ids). "
            "Use one of those, or set context_parallel=1"
        )


# ------------------------------------------------------------------------------ masks


def _mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    is_causal: bool,
    q_docs: torch.Tensor | None,
    k_docs: torch.Tensor | None,
    window_size: int | None = None,
) -> torch.Tensor | None:
    """Boolean (batch or 1, 1, sq, sk) mask, True where a query may attend, or None for all."""
    mask: torch.Tensor | None = None
    if is_causal:
        mask = (q_pos[:, None] >= k_pos[None, :])[None, None]
    if window_size is not None:
        near = (q_pos[:, None] - k_pos[None, :] < window_size)[None, None]
        mask = near if mask is None else mask & near
    if q_docs is not None and k_docs is not None:
        same = (q_docs[:, :, None] == k_docs[:, None, :])[:, None]
        mask = same if mask is None else mask & same
    return mask


def _local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool,
    document_ids: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    window_size: int | None,
    dropout_p: float,
    scale: float | None,
) -> torch.Tensor:
    mask, causal_flag = attn_mask, is_causal and attn_mask is None
    if document_ids is not None or window_size is not None or (attn_mask is not None and is_causal):
        pos = torch.arange(q.shape[2], device=q.device)
        built = _mask(pos, pos, is_causal, document_ids, document_ids, window_size)
        mask, causal_flag = _combined(built, attn_mask), False
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=causal_flag,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )


def _combined(built: torch.Tensor | None, attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    if built is None or attn_mask is None:
        return built if attn_mask is None else attn_mask
    if attn_mask.dtype == torch.bool:
        return built & attn_mask
    return attn_mask.masked_fill(~built, float("-inf"))


# ---------------------------------------------------------------------------- allgather


class _GatherSequence(torch.autograd.Function):
    """All-gather along ``dim`` over the cp group; the backward reduce-scatters the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, size: int, dim: int) -> torch.Tensor:
        ctx.group, ctx.size, ctx.dim = group, size, dim
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        parts = [p.contiguous() for p in grad.chunk(ctx.size, dim=ctx.dim)]
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, group=ctx.group)
        return out, None, None, None


def _gather_ids(ids: torch.Tensor, layout: ContextLayout) -> torch.Tensor:
    parts = [torch.empty_like(ids) for _ in range(layout.size)]
    dist.all_gather(parts, ids.contiguous(), group=layout.group)
    return torch.cat(parts, dim=1)


def _allgather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: ContextLayout,
    is_causal: bool,
    document_ids: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    local = q.shape[2]
    k_all = _GatherSequence.apply(k, layout.group, layout.size, 2)
    v_all = _GatherSequence.apply(v, layout.group, layout.size, 2)
    q_pos = layout.positions(local, q.device)
    k_pos = torch.cat([layout.positions(local, q.device, rank=r) for r in range(layout.size)])
    k_docs = _gather_ids(document_ids, layout) if document_ids is not None else None
    mask = _mask(q_pos, k_pos, is_causal, document_ids, k_docs)
    return F.scaled_dot_product_attention(
        q, k_all, v_all, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


# ----------------------------------------------------------------------------- alltoall


class _PassAlongRing(torch.autograd.Function):
    """Send ``x`` to the next cp rank and receive the previous rank's; the backward passes
    gradients the other way."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layout: ContextLayout, step: int) -> torch.Tensor:
        ctx.layout, ctx.step = layout, step
        return _shift(x.contiguous(), layout, step)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _shift(grad.contiguous(), ctx.layout, -ctx.step), None, None


def _shift(x: torch.Tensor, layout: ContextLayout, step: int) -> torch.Tensor:
    """Send ``x`` ``step`` ranks ahead on the ring, receive from ``step`` ranks behind."""
    ranks = dist.get_process_group_ranks(layout.group)
    send_to = ranks[(layout.rank + step) % layout.size]
    receive_from = ranks[(layout.rank - step) % layout.size]
    received = torch.empty_like(x)
    ops = [
        dist.P2POp(dist.isend, x, send_to, group=layout.group),
        dist.P2POp(dist.irecv, received, receive_from, group=layout.group),
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def _block(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp) of attention over one block; fully masked rows give (0, -inf)."""
    if k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)).float() * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    weights = torch.where(torch.isfinite(lse), torch.exp(scores - lse), torch.zeros_like(scores))
    return torch.matmul(weights.to(v.dtype), v), lse


def _merge(
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    block_out: torch.Tensor,
    block_lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one block's (output, log-sum-exp) into the running ones (fp32 accumulation)."""
    if out is None or lse is None:
        return block_out.float(), block_lse
    merged = torch.logaddexp(lse, block_lse)
    keep = torch.isfinite(merged)
    old_weight = torch.where(keep, torch.exp(lse - merged), torch.zeros_like(merged))
    new_weight = torch.where(keep, torch.exp(block_lse - merged), torch.zeros_like(merged))
    return out * old_weight + block_out.float() * new_weight, merged


def _ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: ContextLayout,
    is_causal: bool,
    document_ids: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    local = q.shape[2]
    q_pos = layout.positions(local, q.device)
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    k_block, v_block, docs_block = k, v, document_ids
    for step in range(layout.size):
        owner = (layout.rank - step) % layout.size
        k_pos = layout.positions(local, q.device, rank=owner)
        mask = _mask(q_pos, k_pos, is_causal, document_ids, docs_block)
        # Recomputed in backward, as flash attention does: saving a block's scores would cost
        # more memory than attention over the whole sequence without context parallelism.
        block = checkpoint(_block, q, k_block, v_block, mask, scale, use_reentrant=False)
        out, lse = _merge(out, lse, *block)
        if step + 1 < layout.size:
            k_block = _PassAlongRing.apply(k_block, layout, 1)
            v_block = _PassAlongRing.apply(v_block, layout, 1)
            if docs_block is not None:
                docs_block = _shift(docs_block.contiguous(), layout, 1)
    assert out is not None
    return out.to(q.dtype)
