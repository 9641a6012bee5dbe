"""Train Llama 3 with Dream Trainer.

    torchrun --standalone --nproc_per_node=2 examples/llama3/train.py --config debug
    torchrun --nproc_per_node=4 examples/llama3/train.py --config debug \\
        --device_parameters.tensor_parallel 2 --training_parameters.max_steps 50

``--config`` picks a preset (``debug`` trains on CPU in minutes; ``1B`` ... ``405B`` use the
published shapes); any config field can then be overridden as ``--dotted.field VALUE``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples.llama3` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, field_validator, model_validator

from dream_trainer import DreamTrainer, DreamTrainerConfig
from dream_trainer.configs import BatchSizes, config_from_command_line, resolve_batch_sizes
from dream_trainer.launch import TransformerShape
from dream_trainer.trainer import Callback
from examples.llama3.configs import (
    MODEL_NAMES,
    LlamaArgs,
    check_model_overrides,
    check_tensor_parallel_degree,
    describe_override_errors,
    get_model_args,
)
from examples.llama3.data import WithDocumentIds, build_dataloader, build_dataset
from examples.llama3.model import Transformer, count_parameters
from examples.llama3.presets import PRESETS, preset
from examples.llama3.sampling import continue_ids
from examples.llama3.tokenizer import Tokenizer, load_tokenizer


class Llama3Config(DreamTrainerConfig):
    """Everything a Llama 3 run needs beyond the trainer's own fields."""

    model: str = "debug"
    """A name from examples/llama3/configs.py: debug, 1B, 3B, 8B, 70B, 405B."""
    model_overrides: dict[str, Any] = {}
    """Fields of LlamaArgs to change, e.g. {"n_layers": 2}."""
    seq_len: int = Field(default=256, ge=1)
    batch_size: int = Field(default=8, ge=1)
    """Sequences per micro-batch on each data-parallel rank. With
    ``training_parameters.global_batch_size`` the gradient accumulation is derived:
    global = batch_size x data-parallel ranks x accumulation."""
    lr: float = Field(default=3e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_steps: int = Field(default=10, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    data: str = "stdlib"
    """"stdlib" (the Python standard library's sources), or a .txt / .jsonl / .bin file."""
    val_data: str | None = None
    """Validation file; default: held-out documents of ``data`` ("stdlib", text, JSONL)."""
    tokenizer: str | None = None
    """None: a BPE tokenizer trained on the stdlib and cached; or a tokenizers .json / tiktoken file."""
    document_causal: bool = False
    """Attend only within each packed document (a new one starts at each bos token) instead of
    across the whole packed sequence."""
    sample_prompt: str = "def "
    sample_tokens: int = Field(default=48, ge=0)

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if name not in MODEL_NAMES:
            raise ValueError(f"model {name!r} is unknown; choose one of {', '.join(MODEL_NAMES)}.")
        return name

    @field_validator("model_overrides")
    @classmethod
    def _known_overrides(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        check_model_overrides(overrides, reserved={"max_seq_len": "seq_len"})
        return overrides

    @model_validator(mode="after")
    def _one_per_rank_batch_size(self) -> Llama3Config:
        micro = self.training_parameters.micro_batch_size
        if micro is not None and micro != self.batch_size:
            raise ValueError(
                f"training_parameters.micro_batch_size={micro} and batch_size={self.batch_size} "
                "both give the per-rank batch; this example takes it from batch_size, so drop "
                "micro_batch_size"
            )
        return self

    @model_validator(mode="after")
    def _valid_model_shape(self) -> Llama3Config:
        try:
            self.model_args()
        except ValidationError as e:
            raise ValueError(
                f"model {self.model!r} with model_overrides {self.model_overrides} is not a valid "
                f"Llama 3 shape: {describe_override_errors(e)}"
            ) from None
        return self

    def model_args(self) -> LlamaArgs:
        """The LlamaArgs of ``model`` with ``model_overrides``, and max_seq_len = seq_len."""
        return get_model_args(self.model, max_seq_len=self.seq_len, **self.model_overrides)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the next-token predictions (vocab-sharded logits too)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))


def model_inputs(batch: dict[str, torch.Tensor]) -> Any:
    """The model's positional inputs: token ids, and document ids when the batch has them."""
    if "document_ids" in batch:
        return batch["input_ids"], batch["document_ids"]
    return batch["input_ids"]


class Llama3Trainer(DreamTrainer):
    config: Llama3Config
    # logging_parameters.performance_metrics (on by default) logs step time, tokens/s, MFU (the
    # model's ``flops_per_token``), memory and rank balance.

    def configure_models(self) -> None:
        args = self.config.model_args()
        check_tensor_parallel_degree(args, self.world.tp_size)
        if self.config.document_causal and self.world.pp_enabled:
            raise ValueError(
                "document_causal=True needs the document ids on every pipeline stage, but under "
                "pipeline parallelism only the first stage gets the batch; set document_causal="
                "false or pipeline_parallel=1"
            )
        if self.tokenizer.vocab_size > args.vocab_size:
            raise ValueError(
                f"The tokenizer has {self.tokenizer.vocab_size} ids but model "
                f"{self.config.model!r} has a vocabulary of only {args.vocab_size}; pass "
                f"--model_overrides.vocab_size {self.tokenizer.vocab_size} or a larger model."
            )
        self.model = Transformer(args)

    def init_weights(self) -> None:
        self.model.init_weights()

    def transformer_shape(self) -> TransformerShape:
        """The model's and batch's shape, for the activation estimate of `dream-trainer plan`."""
        return self.config.model_args().transformer_shape(
            self.config.seq_len, self.config.batch_size
        )

    def resolve_batch_sizes(self, dp_size: int) -> BatchSizes:
        """``batch_size`` per rank; with a global batch, the accumulation is derived from it."""
        training = self.config.training_parameters
        return resolve_batch_sizes(
            dp_size,
            self.config.batch_size,
            training.global_batch_size,
            training.gradient_accumulation_steps,
        )

    def convert_imported_weights(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hugging Face ``LlamaForCausalLM`` weights (``init_from`` a safetensors export) under
        this model's names and RoPE layout; other state as it is."""
        from examples.llama3.hf import from_hf, looks_like_hf

        return from_hf(state, self.config.model_args()) if looks_like_hf(state) else state

    def configure_optimizers(self) -> None:
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=self.config.lr,
            betas=(0.9, 0.95),
            weight_decay=self.config.weight_decay,
        )

    def configure_schedulers(self) -> None:
        total = self.config.training_parameters.max_steps or 1000
        warmup, floor = self.config.warmup_steps, self.config.min_lr_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    @property
    def tokenizer(self) -> Tokenizer:
        if not hasattr(self, "_tokenizer"):
            self._tokenizer = load_tokenizer(self.config.tokenizer)
        return self._tokenizer

    def configure_dataloaders(self) -> tuple[Any, Any]:
        cfg, world = self.config, self.world
        bin_file = cfg.data.endswith(".bin")
        train = build_dataset(cfg.data, self.tokenizer, cfg.seq_len, "all" if bin_file else "train")
        if cfg.val_data is not None:
            val = build_dataset(cfg.val_data, self.tokenizer, cfg.seq_len, "all")
        elif not bin_file:
            val = build_dataset(cfg.data, self.tokenizer, cfg.seq_len, "validation")
        else:
            val = None
        if cfg.document_causal:
            bos = self.tokenizer.bos_id
            train = WithDocumentIds(train, bos)  # type: ignore[assignment]
            val = WithDocumentIds(val, bos) if val is not None else None  # type: ignore[assignment]
        loader_args = dict(dp_rank=world.dp_rank, dp_size=world.dp_size, seed=cfg.seed)
        train_loader = build_dataloader(train, cfg.batch_size, shuffle=True, **loader_args)
        val_loader = None
        if val is not None and len(val) >= cfg.batch_size * world.dp_size:
            val_loader = build_dataloader(val, cfg.batch_size, shuffle=False, **loader_args)
        return train_loader, val_loader

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        # The same code for every layout: under pipeline parallelism the schedule runs it.
        loss = self.forward_backward(
            self.model, model_inputs(batch), batch["labels"], next_token_loss
        )
        if not self.is_accumulating_gradients:
            self.step(self.optimizer)
        return {"loss": loss}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        loss = self.forward_loss(self.model, model_inputs(batch), batch["labels"], next_token_loss)
        return {"val_loss": loss}

    def validate(self, max_batches: int | None = None, log: bool = True) -> dict[str, float]:
        results = super().validate(max_batches=max_batches, log=False)
        if "val_loss" in results:
            results["val_perplexity"] = math.exp(min(results["val_loss"], 50.0))
        if log and results:
            self.log_dict(results, self.global_step)
        return results

    def tokens_in_batch(self, batch: dict[str, torch.Tensor]) -> int:
        """Every position of the packed sequences is a trained token (for tokens/s and MFU)."""
        return batch["input_ids"].numel()

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        if "train/loss" in metrics:
            metrics = {**metrics, "train/lr": self.scheduler.get_last_lr()[0]}
        super().log_dict(metrics, step)


def generate(trainer: Llama3Trainer, prompt: str, max_new_tokens: int) -> str:
    """Sample a continuation on every rank (sharded forwards need all of them), seeded alike."""
    tokenizer = trainer.tokenizer
    trainer.model.eval()
    ids = continue_ids(
        trainer,
        [tokenizer.bos_id, *tokenizer.encode(prompt)],
        max_new_tokens,
        generator=torch.Generator().manual_seed(trainer.config.seed),
        eos_id=tokenizer.eos_id,
    )
    trainer.model.train()
    return tokenizer.decode(ids[1:])


class PrintSample(Callback[Llama3Trainer]):
    """At the end of training, rank 0 prints text sampled from the model."""

    def post_setup(self) -> None:
        trainer = self.trainer
        n = count_parameters(trainer.model)  # DTensor numel is the global size
        if trainer.world.pp_enabled:  # each pipeline rank holds its own stages
            total = torch.tensor(n, device=trainer.device)
            torch.distributed.all_reduce(total, group=trainer.world.get_mesh("pp").get_group())
            n = int(total)
        if trainer.world.is_global_zero:
            print(
                f"llama3 {trainer.config.model}: ~{n / 1e6:.1f}M parameters, "
                f"run dir {trainer.run_dir}",
                flush=True,
            )

    def post_fit(self) -> None:
        trainer = self.trainer
        text = generate(trainer, trainer.config.sample_prompt, trainer.config.sample_tokens)
        if trainer.world.is_global_zero:
            print(f"\n--- sample after {trainer.global_step} steps ---\n{text}\n---", flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = "debug"
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
            raise SystemExit(f"--config needs a preset name: {', '.join(PRESETS)}")
        name = argv[index + 1]
        del argv[index : index + 2]
    try:
        base = preset(name, Llama3Config)
    except ValueError as error:
        raise SystemExit(f"train.py: error: {error}") from None
    config = config_from_command_line(
        base, argv, program="train.py", usage=f"[--config {{{','.join(PRESETS)}}}] "
    )
    Llama3Trainer(config, callbacks=[PrintSample()]).fit()


if __name__ == "__main__":
    main()
