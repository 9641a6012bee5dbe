"""Context-parallel attention on one accelerator: correctness against full attention, and time.

Every cp rank is emulated in this one process: each rank's share of the sequence comes from
:class:`~dream_trainer.parallel.context.layout.ContextLayout` (head-tail load balancing on or
off), and the two rotate methods run their real per-rank code paths:

* ``allgather``: the rank's queries against the whole key/value sequence through
  ``scaled_dot_product_attention`` with the global-position mask (on CUDA this dispatches to
  the memory-efficient kernel, which takes masks);
* ``alltoall``: the rank's queries against one ring block at a time (the block function and the
  log-sum-exp merge the ring uses), blocks taken in ring order.

The outputs of all emulated ranks are put back in sequence order and compared with SDPA on the
full sequence (whatever kernel the device picks: flash on recent CUDA GPUs) in values and in the
gradients of q, k and v, for causal, non-causal and document-causal masks, grouped-query
attention, fp32 and bf16. Times: the forward+backward of the full-sequence kernel and of each
emulated path per rank (what one rank of a real cp group computes, without the communication).

    python benchmarks/gpu/context_attention.py                 # CUDA, the full check
    python benchmarks/gpu/context_attention.py --device cpu --smoke

Exits non-zero when any check is outside its tolerance.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dream_trainer.parallel.context.attention import _block, _mask, _merge
from dream_trainer.parallel.context.layout import ContextLayout

TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 3e-2}
"""Largest allowed |difference| / max |reference| (values and each gradient)."""


@dataclass(frozen=True)
class Case:
    name: str
    is_causal: bool
    documents: int  # 0: no document ids
    heads: int
    kv_heads: int


CASES = [
    Case("causal", True, 0, 8, 8),
    Case("non-causal", False, 0, 8, 8),
    Case("document-causal", True, 3, 8, 8),
    Case("causal GQA 8/2", True, 0, 8, 2),
    Case("odd heads 6/3", True, 0, 6, 3),
]


def document_ids(batch: int, length: int, documents: int, device: torch.device) -> torch.Tensor:
    """Packed sequences: ``documents`` documents of uneven lengths per row."""
    cuts = sorted({int(length * f) for f in (0.21, 0.55, 0.8)[: documents - 1]})
    ids = torch.zeros(batch, length, dtype=torch.long, device=device)
    for cut in cuts:
        ids[:, cut:] += 1
    return ids


def emulated(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    docs: torch.Tensor | None,
    cp: int,
    load_balance: bool,
    is_causal: bool,
) -> torch.Tensor:
    """The full-length output assembled from every emulated rank's share."""
    scale = q.shape[-1] ** -0.5
    layouts = [ContextLayout(None, cp, r, load_balance, method) for r in range(cp)]
    shards = [
        (
            lay.shard(q, 2),
            lay.shard(k, 2),
            lay.shard(v, 2),
            None if docs is None else lay.shard(docs, 1),
        )
        for lay in layouts
    ]
    local = q.shape[2] // cp
    outputs = []
    for rank, lay in enumerate(layouts):
        q_r, _, _, docs_r = shards[rank]
        q_pos = lay.positions(local, q.device)
        if method == "allgather":
            k_all = torch.cat([s[1] for s in shards], dim=2)
            v_all = torch.cat([s[2] for s in shards], dim=2)
            k_pos = torch.cat([lay.positions(local, q.device, rank=r) for r in range(cp)])
            k_docs = None if docs is None else torch.cat([s[3] for s in shards], dim=1)
            mask = _mask(q_pos, k_pos, is_causal, docs_r, k_docs)
            out = F.scaled_dot_product_attention(
                q_r, k_all, v_all, attn_mask=mask, scale=scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )  # fmt: skip
        else:
            merged: torch.Tensor | None = None
            lse: torch.Tensor | None = None
            for step in range(cp):
                owner = (rank - step) % cp
                _, k_b, v_b, docs_b = shards[owner]
                k_pos = lay.positions(local, q.device, rank=owner)
                mask = _mask(q_pos, k_pos, is_causal, docs_r, docs_b)
                merged, lse = _merge(merged, lse, *_block(q_r, k_b, v_b, mask, scale))
            assert merged is not None
            out = merged.to(q.dtype)
        outputs.append(out)
    # Back to sequence order: rank r's pieces are the chunks ContextLayout.chunk_ids(r) names.
    pieces: dict[int, torch.Tensor] = {}
    for lay, out in zip(layouts, outputs, strict=True):
        ids = lay.chunk_ids()
        for chunk_id, piece in zip(ids, out.chunk(len(ids), dim=2), strict=True):
            pieces[chunk_id] = piece
    return torch.cat([pieces[i] for i in range(len(pieces))], dim=2)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: torch.Tensor | None, is_causal: bool
) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    if docs is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa)
    pos = torch.arange(q.shape[2], device=q.device)
    mask = _mask(pos, pos, is_causal, docs, docs)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.float().abs().max().clamp_min(1e-12)
    return float((got.float() - want.float()).abs().max() / scale)


def values_and_grads(
    fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], grad_out: torch.Tensor
) -> list[torch.Tensor]:
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach(), *[leaf.grad for leaf in leaves if leaf.grad is not None]]


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn`` (synchronized on accelerators)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one cp degree, fp32")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu, or on a machine with a GPU", file=sys.stderr)
        return 2
    dtypes = [torch.float32, torch.bfloat16]
    if args.smoke:
        args.seq, args.head_dim, args.cp, args.repeats, dtypes = 64, 16, [2], 1, [torch.float32]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, seq {args.seq}, head_dim {args.head_dim}")
    header = (
        f"{'case':<16} {'dtype':<9} {'cp':>3} {'balance':>7} {'method':<9} "
        f"{'out err':>9} {'grad err':>9} {'full ms':>8} {'rank ms':>8} {'ratio':>6}"
    )
    print(header)
    failures = 0
    generator = torch.Generator(device="cpu").manual_seed(0)
    for case in CASES:
        for dtype in dtypes:
            shape_q = (args.batch, case.heads, args.seq, args.head_dim)
            shape_kv = (args.batch, case.kv_heads, args.seq, args.head_dim)
            q, k, v = (
                torch.randn(s, generator=generator).to(device, dtype)
                for s in (shape_q, shape_kv, shape_kv)
            )
            grad_out = torch.randn(shape_q, generator=generator).to(device, dtype)
            docs = (
                document_ids(args.batch, args.seq, case.documents, device)
                if case.documents
                else None
            )

            full = functools.partial(reference, docs=docs, is_causal=case.is_causal)
            # The reference in fp32 math: what the emulated paths must reproduce.
            want = values_and_grads(full, [q.float(), k.float(), v.float()], grad_out.float())
            run_full = functools.partial(values_and_grads, full, [q, k, v], grad_out)
            full_ms = timed(run_full, device, args.repeats)
            for cp in args.cp:
                for balance in (True, False):
                    for method in ("allgather", "alltoall"):
                        path = functools.partial(
                            emulated, method, docs=docs, cp=cp, load_balance=balance,
                            is_causal=case.is_causal,
                        )  # fmt: skip
                        got = values_and_grads(path, [q, k, v], grad_out)
                        out_err = relative_error(got[0], want[0])
                        grad_err = max(relative_error(g, w) for g, w in zip(got[1:], want[1:]))
                        run_path = functools.partial(values_and_grads, path, [q, k, v], grad_out)
                        rank_ms = timed(run_path, device, args.repeats) / cp
                        ok = max(out_err, grad_err) <= TOLERANCE[dtype]
                        failures += not ok
                        print(
                            f"{case.name:<16} {str(dtype)[6:]:<9} {cp:>3} {balance!s:>7} "
                            f"{method:<9} {out_err:>9.2e} {grad_err:>9.2e} {full_ms:>8.2f} "
                            f"{rank_ms:>8.2f} {rank_ms / full_ms:>6.2f}" + ("" if ok else "  FAIL")
                        )
    print(
        "rank ms: one emulated rank's forward+backward (the total over all ranks / cp), without "
        "communication; ratio: rank ms / full ms (ideal 1/cp for balanced causal)."
    )
    print("all checks passed" if not failures else f"{failures} checks FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
