"""The Llama 3 example's training FLOPs per token, by hand and against torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from examples.llama3.configs import get_model_args
from examples.llama3.model import Transformer, flops_per_token, matmul_parameters


def test_debug_model_flops_per_token_by_hand():
    args = get_model_args("debug", max_seq_len=256)
    # dim 256, 4 layers, 8 query heads and 4 kv heads of 32, SwiGLU hidden 704, vocab 2048.
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads) == (256, 4, 8, 4)
    assert (args.head_dim, args.ffn_hidden_dim, args.vocab_size) == (32, 704, 2048)
    per_layer = 256 * 8 * 32 * 2 + 256 * 4 * 32 * 2 + 3 * 256 * 704  # wq+wo, wk+wv, w1 w2 w3
    n = 4 * per_layer + 256 * 2048  # blocks and the output projection; the embedding is a lookup
    assert matmul_parameters(args) == n == 3_473_408
    assert flops_per_token(args, 256) == 6 * n + 12 * 4 * 8 * 32 * 256
    model = Transformer(args)  # never run: the method reads only the shape
    assert model.flops_per_token() == flops_per_token(args, 256)  # default: max_seq_len
    assert model.flops_per_token(64) == 6 * n + 12 * 4 * 8 * 32 * 64


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_matches_torch_flop_counter_for_forward_and_backward(tied):
    """Exact on the math SDPA backend (tolerance: none, integers compared).

    Both count a multiply-add as 2 FLOPs and count only matmuls (mm and bmm here): norms,
    RoPE, softmax, SiLU and the loss are elementwise, and the embedding lookup and its gradient
    (an index-add) are not matmuls, which is why the definition leaves the embedding out. The
    math backend computes attention as two full (b*h, s, s) bmm products, causal mask included,
    as the definition's ``12 L H d S`` term does. Not compared: fused attention kernels, where
    the counter charges 2.5x the forward for the backward (it counts the recomputed scores)
    instead of 2x, and CPU flash attention, which it does not count at all.
    """
    seq, batch = 64, 2
    args = get_model_args("debug", max_seq_len=seq, tie_embeddings=tied)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    assert model.is_tied == tied
    tokens = torch.randint(0, args.vocab_size, (batch, seq))
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        logits = model(tokens)
        F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    counted = counter.get_total_flops()
    assert {str(op) for op in counter.get_flop_counts()["Global"]} == {"aten.mm", "aten.bmm"}
    assert counted == model.flops_per_token(seq) * batch * seq
