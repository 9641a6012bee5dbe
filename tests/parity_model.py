"""A small transformer (attention + SwiGLU MLP + RMSNorm) and trainer used by the parity tests."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.utils.data import DataLoader, Dataset

from dream_trainer import DreamTrainer, DreamTrainerConfig
from dream_trainer.parallel import (
    colwise_parallel,
    context_parallel_attention,
    prepare_module_input,
    rowwise_parallel,
    sequence_parallel,
)

VOCAB, DIM, HEADS, LAYERS, SEQ = 64, 32, 4, 2, 16


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head_dim = DIM // HEADS
        self.wq, self.wk, self.wv = (nn.Linear(DIM, DIM, bias=False) for _ in range(3))
        self.wo = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 heads: under TP each rank holds only its share of the heads.
        q, k, v = (
            w(x).view(b, t, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv)
        )
        # SDPA without context parallelism; across the cp ranks under it.
        out = context_parallel_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(DIM, 2 * DIM, bias=False)
        self.w3 = nn.Linear(DIM, 2 * DIM, bias=False)
        self.w2 = nn.Linear(2 * DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, sequence_parallel: bool) -> None:
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.attention_norm = nn.RMSNorm(DIM)
        self.attention = Attention()
        self.ffn_norm = nn.RMSNorm(DIM)
        self.feed_forward = FeedForward()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))

    def parallelize_plan(self, loss_parallel: bool) -> dict[str, Any]:
        plan: dict[str, Any] = {
            "attention.wq": colwise_parallel(),
            "attention.wk": colwise_parallel(),
            "attention.wv": colwise_parallel(),
            "feed_forward.w1": colwise_parallel(),
            "feed_forward.w3": colwise_parallel(),
        }
        if not self.sequence_parallel:
            plan["attention.wo"] = rowwise_parallel()
            plan["feed_forward.w2"] = rowwise_parallel()
            return plan
        to_replicate = prepare_module_input(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
        )
        plan.update(
            {
                "attention_norm": sequence_parallel(),
                "ffn_norm": sequence_parallel(),
                "attention": to_replicate,
                "feed_forward": to_replicate,
                "attention.wo": rowwise_parallel(output_layouts=Shard(1)),
                "feed_forward.w2": rowwise_parallel(output_layouts=Shard(1)),
            }
        )
        return plan


class TinyTransformer(nn.Module):
    def __init__(self, sequence_parallel: bool = False, n_layers: int = LAYERS) -> None:
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block(sequence_parallel) for _ in range(n_layers)])
        self.norm = nn.RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Modules a pipeline stage does not hold are None (dream_trainer.parallel.pipeline).
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers:
            h = layer(h)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h

    def init_weights(self) -> None:
        for name, param in self.named_parameters():
            if "norm" in name:
                nn.init.ones_(param)
            else:
                nn.init.normal_(param, std=0.1)

    def parallelize_plan(self, loss_parallel: bool) -> dict[str, Any]:
        sp = self.sequence_parallel
        plan = {
            "tok_embeddings": rowwise_parallel(
                input_layouts=Replicate(), output_layouts=Shard(1) if sp else Replicate()
            ),
            "output": colwise_parallel(
                input_layouts=Shard(1) if sp else Replicate(),
                output_layouts=Shard(-1) if loss_parallel else Replicate(),
                use_local_output=not loss_parallel,
            ),
        }
        if sp:
            plan["norm"] = sequence_parallel()
        return plan


class TokenDataset(Dataset[dict[str, torch.Tensor]]):
    """Fixed random token sequences; labels are the next tokens."""

    def __init__(self, n: int, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.tokens[i, :-1], "labels": self.tokens[i, 1:]}


class ParityConfig(DreamTrainerConfig):
    global_batch: int = 8
    lr: float = 1e-2
    optimizer: str = "adamw"
    sequence_parallel: bool = False
    dataset_size: int = 128
    token_normalized: bool = False
    n_layers: int = LAYERS
    shuffle: bool = False


class ParityTrainer(DreamTrainer):
    config: ParityConfig

    def configure_models(self) -> None:
        self.model = TinyTransformer(
            sequence_parallel=self.config.sequence_parallel, n_layers=self.config.n_layers
        )

    def configure_optimizers(self) -> None:
        if self.config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.config.lr)
        else:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.config.lr)

    def configure_dataloaders(self) -> tuple[Any, Any]:
        data = TokenDataset(self.config.dataset_size)
        per_rank = self.config.global_batch // self.world.dp_size
        sampler = self.distributed_sampler(data, shuffle=self.config.shuffle)
        return DataLoader(data, batch_size=per_rank, sampler=sampler), None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        if self.config.token_normalized:
            valid = batch["labels"] != 0  # token id 0 plays padding
            labels = batch["labels"].masked_fill(~valid, -100)
            loss = self.forward_backward(
                self.model, batch["inputs"], labels, summed_cross_entropy, num_tokens=valid.sum()
            )
        else:
            loss = self.forward_backward(
                self.model, batch["inputs"], batch["labels"], cross_entropy
            )
        if not self.is_accumulating_gradients:
            self.step(self.optimizer)
        return {"loss": loss}


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1))


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1), reduction="sum")
