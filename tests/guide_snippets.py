"""The parallelism guide's code (../shared/seeds/parallelism-guide.md), adapted only as allowed.

Each section below is one snippet of the guide. What changed: ``from fsdp2_utils import ...``
became ``from dream_trainer.parallel import ...``; names the guide uses without importing
(``fully_shard``, ``replicate``, ``Shard``, ...) are imported; what the guide elides (module
bodies, data, the training step) is filled in, marked ``# filled in``. The trainers combine the
guide's ``MyTrainer(ModelSetupMixin)`` with :class:`GuideTrainer`, which supplies the rest of a
trainer. Importable by qualified name, so ranks of ``tests.multirank`` can run it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed._composable.replicate import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.utils.data import DataLoader, Dataset

from dream_trainer import DreamTrainer, DreamTrainerConfig
from dream_trainer.configs import DeviceParameters, TrainingParameters
from dream_trainer.parallel import (
    FullyShard,
    ParallelPlan,
    apply_fully_shard,
    apply_tensor_parallel,
    colwise_parallel,
    fully_shard,
    prepare_module_input,
    rowwise_parallel,
    sequence_parallel,
)
from dream_trainer.trainer.mixins import ModelSetupMixin

VOCAB, DIM, HEADS, SEQ, LAYERS, FEATURES = 64, 32, 4, 8, 2, 16
STEPS = 6

# --------------------------------------------------------------- filled in: the model bodies


class Attention(nn.Module):  # filled in
    def __init__(self) -> None:
        super().__init__()
        self.head_dim = DIM // HEADS
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(DIM, DIM, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (
            w(x).view(b, t, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=mask is None)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):  # filled in
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(DIM, 2 * DIM, bias=False)
        self.w2 = nn.Linear(2 * DIM, DIM, bias=False)
        self.w3 = nn.Linear(DIM, 2 * DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class BlockBody(nn.Module):  # filled in: the parts every guide block declares
    def __init__(self) -> None:
        super().__init__()
        self.attention = Attention()
        self.feed_forward = FeedForward()
        self.attention_norm = nn.RMSNorm(DIM)
        self.ffn_norm = nn.RMSNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), None)
        return h + self.feed_forward(self.ffn_norm(h))


def init_all(model: nn.Module) -> None:  # filled in
    for name, param in model.named_parameters():
        if "norm" in name:
            nn.init.ones_(param)
        else:
            nn.init.normal_(param, std=0.1)


# --------------------------------------- "Data Parallelism: Using PyTorch's Replicate API"


class DDPTrainer(ModelSetupMixin):
    def apply_replicate(self, dp_replicate_mesh: DeviceMesh):
        # Wraps the model in place with Distributed Data Parallel
        replicate(self.model, device_mesh=dp_replicate_mesh, bucket_cap_mb=100)


def ddp_config() -> DreamTrainerConfig:
    return DreamTrainerConfig(
        device_parameters=DeviceParameters.DDP(
            compile_model=True,
            checkpoint_activations=False,
        )
    )


# --------------------------------------------------------------- "FSDP: Using FSDP2 API"


def fsdp_config() -> DreamTrainerConfig:
    return DreamTrainerConfig(
        device_parameters=DeviceParameters.FSDP(
            tensor_parallel=1,
            dp_shard="auto",
            compile_model=True,
            cpu_offload=False,
            checkpoint_activations=False,
        )
    )


class FSDPTrainer(ModelSetupMixin):
    def apply_fully_shard(self, config: dict[str, Any]) -> None:
        # NOTE: if using Pipeline Parallelism, make sure to set reshard_after_forward=False on all layers for optimal performance.
        for layer in self.model.layers:
            fully_shard(layer, **config)
        fully_shard(self.model, **config, reshard_after_forward=False)


# ------------------------------------------------------- "FSDP: ... with fsdp2-utils" (protocol)


class TransformerBlock(nn.Module, FullyShard):
    attention: Attention
    feed_forward: FeedForward
    attention_norm: nn.RMSNorm
    ffn_norm: nn.RMSNorm

    def __init__(self) -> None:  # filled in
        super().__init__()
        self.attention = Attention()
        self.feed_forward = FeedForward()
        self.attention_norm = nn.RMSNorm(DIM)
        self.ffn_norm = nn.RMSNorm(DIM)

    forward = BlockBody.forward  # filled in

    def fully_shard(self, config: dict[str, Any]):
        fully_shard(self.attention, **config)
        fully_shard(self.feed_forward, **config)
        fully_shard(self.attention_norm, **config)
        fully_shard(self.ffn_norm, **config)


class Transformer(nn.Module, FullyShard):
    input: nn.Linear
    layers: nn.ModuleList
    output: nn.Linear

    def __init__(self) -> None:  # filled in
        super().__init__()
        self.input = nn.Linear(FEATURES, DIM)
        self.layers = nn.ModuleList(TransformerBlock() for _ in range(LAYERS))
        self.output = nn.Linear(DIM, VOCAB)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # filled in
        h = self.input(features)
        for layer in self.layers:
            h = layer(h)
        return self.output(h)

    def fully_shard(self, config: dict[str, Any]):
        fully_shard(self.input, **config)
        fully_shard(self.layers, **config)
        fully_shard(self.output, **config, reshard_after_forward=False)


class ProtocolFSDPTrainer(ModelSetupMixin):
    def apply_fully_shard(self, config: dict[str, Any]) -> None:
        # apply_fully_shard will override reshard_after_forward to `False` for all blocks when Pipeline Parallelism is enabled.
        apply_fully_shard(self.model, config, pp_enabled=self.world.pp_enabled)


# ------------------------------------------------------- "Tensor Parallelism: Configuration"


def tp_config() -> DreamTrainerConfig:
    return DreamTrainerConfig(
        device_parameters=DeviceParameters.FSDP(
            tensor_parallel="auto",
            dp_shard=1,  # no FSDP
            compile_model=True,
            cpu_offload=False,
            checkpoint_activations=False,
        )
    )


class TransformerBlockParallel(ParallelPlan):
    attention_norm: nn.RMSNorm
    attention: Attention
    feed_forward: FeedForward
    ffn_norm: nn.RMSNorm

    def parallel_plan(self, _):
        return {
            "attention_norm": sequence_parallel(self.attention_norm),
            "attention": prepare_module_input(
                self.attention,
                input_layouts=(Shard(1), None),
                desired_input_layouts=(Replicate(), None),
            ),
            "attention.wq": colwise_parallel(self.attention.wq),
            "attention.wk": colwise_parallel(self.attention.wk),
            "attention.wv": colwise_parallel(self.attention.wv),
            "attention.wo": rowwise_parallel(self.attention.wo, output_layouts=Shard(1)),
            "ffn_norm": sequence_parallel(self.ffn_norm),
            "feed_forward": prepare_module_input(
                self.feed_forward,
                input_layouts=(Shard(1),),
                desired_input_layouts=(Replicate(),),
            ),
            "feed_forward.w1": colwise_parallel(self.feed_forward.w1),
            "feed_forward.w2": rowwise_parallel(self.feed_forward.w2, output_layouts=Shard(1)),
            "feed_forward.w3": colwise_parallel(self.feed_forward.w3),
        }


class TransformerParallel(FullyShard, ParallelPlan):
    tok_embeddings: nn.Embedding
    norm: nn.RMSNorm
    output: nn.Linear
    layers: nn.ModuleDict

    def parallel_plan(self, loss_parallel: bool):
        return (
            {
                "tok_embeddings": rowwise_parallel(
                    self.tok_embeddings,
                    input_layouts=Replicate(),
                    output_layouts=Shard(1),
                ),
                "norm": sequence_parallel(self.norm),
                "output": colwise_parallel(
                    self.output,
                    input_layouts=Shard(1),
                    output_layouts=Shard(-1) if loss_parallel else Replicate(),
                    use_local_output=not loss_parallel,
                ),
            },
        )


class TPTrainer(ModelSetupMixin):
    def apply_fully_shard(self, tp_mesh: DeviceMesh) -> None:
        apply_tensor_parallel(
            self.model, tp_mesh=tp_mesh, loss_parallel=self.world.loss_parallel_enabled
        )


class TPBlock(BlockBody, TransformerBlockParallel):  # filled in: a block with the guide's plan
    pass


class TPTransformer(nn.Module, TransformerParallel):  # filled in: a model with the guide's plan
    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleDict({str(i): TPBlock() for i in range(LAYERS)})
        self.norm = nn.RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Modules a pipeline stage does not hold are None.
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h


# ------------------------------------------------------- "Context Parallelism: Configuration"
# (the guide's snippet configures tensor parallelism; context parallelism proper is issue 9)


def cp_section_config() -> DreamTrainerConfig:
    return DreamTrainerConfig(
        device_parameters=DeviceParameters.FSDP(
            tensor_parallel=2,  # Split across 2 GPUs
            dp_shard="auto",
        )
    )


# ------------------------------------------------------ "Pipeline Parallelism: Configuration"


def pp_config() -> DreamTrainerConfig:
    return DreamTrainerConfig(
        device_parameters=DeviceParameters(
            pipeline_parallel_size=2,  # Split across 2 GPUs
            pipeline_parallel_config={
                "num_microbatches": 4,  # Number of microbatches
                "schedule": "1F1B",  # Pipeline schedule
            },
        )
    )


class PPTrainer(DreamTrainer):
    def configure_models(self):
        self.model = TPTransformer()  # filled in
        # Model is automatically split into pipeline stages
        self.model = self.model.to(self.device)


# ------------------------------------------------ "Combining Parallelism: FSDP + Tensor Parallel"


def fsdp_tp_config() -> DreamTrainerConfig:
    return DreamTrainerConfig(
        device_parameters=DeviceParameters(
            data_parallel_size=2,  # 2-way data parallel
            tensor_parallel_size=2,  # 2-way tensor parallel
            fsdp_config={"sharding_strategy": "FULL_SHARD", "mixed_precision": True},
        )
    )


# ------------------------------------------------------------ filled in: the rest of a trainer


class TokenData(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(11)
        self.tokens = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
        self.features = torch.randn(n, SEQ, FEATURES, generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "tokens": self.tokens[i, :-1],
            "features": self.features[i],
            "labels": self.tokens[i, 1:],
        }


MODELS = {
    "blocks": lambda: PlainTransformer(),
    "protocol": lambda: Transformer(),
    "tp": lambda: TPTransformer(),
}


class PlainTransformer(nn.Module):  # filled in: a model whose blocks sit in `layers`
    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(BlockBody() for _ in range(LAYERS))
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(h)


class GuideConfig(DreamTrainerConfig):
    model_kind: str = "blocks"
    global_batch: int = 8


class GuideTrainer(DreamTrainer):
    """Everything the guide's MyTrainer leaves out."""

    config: GuideConfig

    def configure_models(self) -> None:
        self.model = MODELS[self.config.model_kind]()

    def init_weights(self) -> None:
        init_all(self.model)

    def configure_optimizers(self) -> None:
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)

    def configure_dataloaders(self) -> tuple[Any, Any]:
        data = TokenData()
        sampler = self.distributed_sampler(data, shuffle=False)
        per_rank = self.config.global_batch // self.world.dp_size
        return DataLoader(data, batch_size=per_rank, sampler=sampler), None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        inputs = batch["features"] if self.config.model_kind == "protocol" else batch["tokens"]
        loss = self.forward_backward(self.model, inputs, batch["labels"], self.loss)
        if not self.is_accumulating_gradients:
            self.step(self.optimizer)
        return {"loss": loss}

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.compute_dtype = logits.dtype
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        super().log_dict(metrics, step)
        if "train/loss" in metrics:
            self.losses.append(metrics["train/loss"])


def as_guide_config(config: DreamTrainerConfig, model_kind: str) -> GuideConfig:
    """The guide's config with the fields a runnable test needs (steps, seed, no backends)."""
    return GuideConfig(
        **{
            **config.model_dump(),
            "seed": 5,
            "model_kind": model_kind,
            "training_parameters": TrainingParameters(max_steps=STEPS),
            "logging_parameters": {"backends": [], "log_every_n_steps": 1},
        }
    )
