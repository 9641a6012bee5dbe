"""Continue a JSONL file of prompts with the Llama 3 model, on every data-parallel replica.

    torchrun --standalone --nproc_per_node=4 examples/llama3/generate.py \\
        --prompts prompts.jsonl --output completions.jsonl --max_new_tokens 64 --greedy \\
        [--checkpoint runs/llama3/debug/<run>/checkpoints/step_00000120] [--resume]

Each prompt record holds ``id`` and ``prompt``; each output record ``id``, ``prompt`` and
``completion``, in input order. The prompts are split evenly over the data-parallel replicas
(a TP group or a PP pipeline is one replica); the output equals the one-process output.
With ``--resume``, ids already in the output are skipped. Weights come from ``--checkpoint``
(the run's config comes with them) or are freshly initialized. Any config field can be
overridden as after ``train.py`` (``--device_parameters.tensor_parallel 2``).
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples.llama3` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from dream_trainer.configs import config_from_command_line
from dream_trainer.inference import StreamSummary
from examples.llama3.export_hf import checkpoint_config
from examples.llama3.presets import PRESETS, preset
from examples.llama3.sampling import continue_ids
from examples.llama3.train import Llama3Config, Llama3Trainer


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The prompt records of a JSONL file; a record without ``id`` or ``prompt`` is an error."""
    records = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}:{number} is not valid JSON: {error}") from None
            missing = [
                k for k in ("id", "prompt") if not isinstance(record, dict) or k not in record
            ]
            if missing:
                raise ValueError(
                    f"{path}:{number} has no {' or '.join(repr(k) for k in missing)} field; each "
                    'line must be an object like {"id": "q1", "prompt": "def add(a, b):"}'
                )
            if not isinstance(record["prompt"], str):
                raise ValueError(f"{path}:{number}: 'prompt' must be a string")
            records.append(record)
    return records


class Llama3Generator(Llama3Trainer):
    """The Llama 3 trainer whose ``predict_step`` continues prompts."""

    max_new_tokens: int = 32
    greedy: bool = False

    def predict_step(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        tokenizer = self.tokenizer
        # Under FSDP every rank runs as many forwards, so generation never stops early.
        fixed_steps = self.world.dp_shard_size > 1
        out = []
        for record in batch:
            # Seeded by the id, so a prompt gets the same sample whichever rank runs it.
            seed = (self.config.seed * 1_000_003 + zlib.crc32(str(record["id"]).encode())) % 2**63
            prompt_ids = [tokenizer.bos_id, *tokenizer.encode(record["prompt"])]
            ids = continue_ids(
                self,
                prompt_ids,
                self.max_new_tokens,
                greedy=self.greedy,
                generator=torch.Generator().manual_seed(seed),
                eos_id=tokenizer.eos_id,
                fixed_steps=fixed_steps,
            )
            completion = tokenizer.decode(ids[len(prompt_ids) :])
            out.append({"id": record["id"], "prompt": record["prompt"], "completion": completion})
        return out


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, Llama3Config]:
    parser = argparse.ArgumentParser(
        prog="generate.py",
        description=__doc__.split("\n")[0] if __doc__ else None,
        epilog="Other --dotted.field VALUE options override the run config (see train.py --help).",
    )
    parser.add_argument("--prompts", required=True, help="JSONL with 'id' and 'prompt' per line")
    parser.add_argument("--output", required=True, help="JSONL written with id, prompt, completion")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    parser.add_argument("--resume", action="store_true", help="skip ids already in --output")
    parser.add_argument("--checkpoint", default=None, help="a step_* checkpoint directory")
    parser.add_argument("--config", default="debug", choices=list(PRESETS))
    parser.add_argument("--batch_size_prompts", type=int, default=4, help="prompts per call")
    options, overrides = parser.parse_known_args(list(argv))
    if options.max_new_tokens < 0:
        parser.error(f"--max_new_tokens must be 0 or more, got {options.max_new_tokens}")
    if options.batch_size_prompts < 1:
        parser.error(f"--batch_size_prompts must be at least 1, got {options.batch_size_prompts}")
    if options.checkpoint is not None:
        base = checkpoint_config(options.checkpoint)
        base = base.model_copy(
            update={
                "checkpoint_parameters": base.checkpoint_parameters.model_copy(
                    update={"init_from": options.checkpoint, "enable": False}
                )
            }
        )
    else:
        base = preset(options.config, Llama3Config)
    config = config_from_command_line(base, overrides, program="generate.py")
    return options, config


def main(argv: Sequence[str] | None = None) -> StreamSummary:
    options, config = parse(sys.argv[1:] if argv is None else argv)
    prompts = read_prompts(options.prompts)
    generator = Llama3Generator(config)
    generator.max_new_tokens = options.max_new_tokens
    generator.greedy = options.greedy
    summary = generator.predict_to_jsonl(
        prompts,
        options.output,
        key="id",
        resume=options.resume,
        batch_size=options.batch_size_prompts,
    )
    return summary


if __name__ == "__main__":
    main()
