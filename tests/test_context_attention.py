"""context_parallel_attention on 2 and 4 CPU ranks against SDPA over the whole sequence.

Values and gradients of queries, keys and values match within 1e-5 for causal, non-causal and
document-causal masks, grouped-query and odd head counts, both rotate methods, with and without
head-tail load balancing.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dream_trainer.parallel.context import (
    ContextLayout,
    activated,
    context_parallel_attention,
    global_sequence_length,
    sequence_positions,
)
from tests.multirank import run_on_ranks

SEQ, DIM, BATCH = 16, 8, 2


def reference_attention(q, k, v, causal: bool, docs: torch.Tensor | None) -> torch.Tensor:
    """Plain SDPA over the full sequence with an explicitly built mask."""
    n = q.shape[2]
    mask = torch.ones(n, n, dtype=torch.bool)
    if causal:
        mask = torch.tril(mask)
    mask = mask[None, None].expand(q.shape[0], 1, n, n)
    if docs is not None:
        mask = mask & (docs[:, None, :, None] == docs[:, None, None, :])
    repeat = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1), attn_mask=mask
    )


def packed_documents(generator: torch.Generator) -> torch.Tensor:
    """Per-token document ids of a packed batch: a few documents of random lengths per row."""
    rows = []
    for _ in range(BATCH):
        cuts = sorted(torch.randperm(SEQ - 1, generator=generator)[:3].add(1).tolist())
        ids = torch.zeros(SEQ, dtype=torch.long)
        for cut in cuts:
            ids[cut:] += 1
        rows.append(ids)
    return torch.stack(rows)


def attention_on_ranks(
    rotate: str, load_balance: bool, causal: bool, documents: bool, heads: int, kv_heads: int
) -> dict[str, float]:
    g = torch.Generator().manual_seed(11)
    q, k, v, upstream = (
        torch.randn(BATCH, h, SEQ, DIM, generator=g) for h in (heads, kv_heads, kv_heads, heads)
    )
    docs = packed_documents(g) if documents else None
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*full, causal, docs)
    (expected * upstream).sum().backward()

    layout = ContextLayout(
        dist.group.WORLD, dist.get_world_size(), dist.get_rank(), load_balance, rotate
    )
    local = [layout.shard(t, 2).detach().requires_grad_() for t in (q, k, v)]
    local_docs = layout.shard(docs, 1) if docs is not None else None
    with activated(layout):
        out = context_parallel_attention(*local, is_causal=causal, document_ids=local_docs)
        positions = sequence_positions(out.shape[2])
    (out * layout.shard(upstream, 2)).sum().backward()
    errors = {"out": (out - layout.shard(expected, 2)).abs().max().item()}
    for name, mine, theirs in zip("qkv", local, full):
        errors[f"d{name}"] = (mine.grad - layout.shard(theirs.grad, 2)).abs().max().item()
    errors["positions"] = float(
        not torch.equal(positions, layout.shard(torch.arange(SEQ)[None], 1)[0])
    )
    errors["calls"] = layout.attention_calls
    return errors


CASES = [
    # rotate, load_balance, causal, documents, heads, kv_heads
    *[
        (r, lb, True, False, 4, 4)
        for r, lb in itertools.product(["allgather", "alltoall"], [True, False])
    ],
    ("allgather", True, False, False, 4, 4),
    ("alltoall", True, False, False, 4, 4),
    ("allgather", True, True, True, 4, 2),
    ("alltoall", True, True, True, 4, 2),
    ("alltoall", False, False, True, 3, 1),
    ("allgather", False, True, False, 3, 3),
]


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize(("rotate", "balance", "causal", "docs", "heads", "kv_heads"), CASES)
def test_context_parallel_attention_matches_sdpa_on_the_full_sequence(
    ranks: int, rotate: str, balance: bool, causal: bool, docs: bool, heads: int, kv_heads: int
) -> None:
    for rank, errors in enumerate(
        run_on_ranks(attention_on_ranks, ranks, rotate, balance, causal, docs, heads, kv_heads)
    ):
        assert errors.pop("calls") == 1
        assert errors.pop("positions") == 0.0, f"rank {rank}: rotary positions are not global"
        worst = {name: err for name, err in errors.items() if err > 1e-5}
        assert not worst, f"rank {rank}: {worst}"


def test_without_context_parallelism_it_is_sdpa_with_the_requested_mask() -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, SEQ, DIM, generator=g) for _ in range(3))
    docs = packed_documents(g)
    for causal, documents in itertools.product([True, False], [None, docs]):
        got = context_parallel_attention(q, k, v, is_causal=causal, document_ids=documents)
        torch.testing.assert_close(got, reference_attention(q, k, v, causal, documents))
    window = context_parallel_attention(q, k, v, window_size=4)
    near = torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool)) & ~torch.tril(
        torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=-4
    )
    torch.testing.assert_close(window, F.scaled_dot_product_attention(q, k, v, attn_mask=near))
    assert torch.equal(sequence_positions(5), torch.arange(5))


def refusals() -> list[str]:
    layout = ContextLayout(dist.group.WORLD, 2, dist.get_rank())
    q = torch.randn(1, 2, 8, 4)
    messages = []
    with activated(layout):
        for kwargs in (
            {"attn_mask": torch.ones(8, 8, dtype=torch.bool)},
            {"window_size": 4},
            {"dropout_p": 0.1},
        ):
            try:
                context_parallel_attention(q, q, q, **kwargs)
            except ValueError as error:
                messages.append(str(error))
    try:
        layout.shard(torch.zeros(1, 6), 1)
    except ValueError as error:
        messages.append(str(error))
    return messages


def test_masks_it_cannot_split_are_refused_not_replaced() -> None:
    messages = run_on_ranks(refusals, 2)[0]
    assert len(messages) == 4
    assert "attn_mask (an arbitrary mask tensor)" in messages[0]
    assert "window_size=4 (a sliding-window mask)" in messages[1]
    assert "dropout_p=0.1" in messages[2]
    assert "must be a multiple of 4 (2 x context_parallel=2)" in messages[3]


def test_the_global_sequence_length_is_known_on_the_host_under_every_split():
    assert global_sequence_length(12) == 12  # no context parallelism
    for balanced, local, full in ((True, 6, 24), (False, 6, 24)):
        with activated(ContextLayout(None, 4, 1, load_balance=balanced)):
            assert global_sequence_length(local) == full
            assert len(sequence_positions(local)) == local
