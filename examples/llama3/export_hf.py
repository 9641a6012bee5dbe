"""Export a Llama 3 checkpoint of this example as a Hugging Face ``LlamaForCausalLM`` directory.

    python examples/llama3/export_hf.py runs/llama3/.../checkpoints/step_00000100 hf_out \\
        [--dtype bfloat16]

The model's shapes come from the run's config saved in the checkpoint's ``trainer.json``; runs
in one process, holding the whole model in CPU memory. Then
``transformers.LlamaForCausalLM.from_pretrained("hf_out")`` loads it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples.llama3` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from dream_trainer.trainer.checkpointing.checkpointer import TRAINER_FILE
from dream_trainer.trainer.checkpointing.safe_io import read_json
from examples.llama3.hf import export_hf
from examples.llama3.train import Llama3Config

logger = logging.getLogger("dream_trainer.export")


def checkpoint_config(checkpoint: str | Path) -> Llama3Config:
    """The run config saved in ``checkpoint/trainer.json``."""
    file = Path(checkpoint) / TRAINER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a Dream Trainer checkpoint: no {file.name}")
    saved = read_json(file)
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise RuntimeError(f"the checkpoint file {file} holds no run config")
    return Llama3Config.model_validate(saved["config"])


def token_ids(config: Llama3Config) -> tuple[int | None, int | None]:
    """The run's tokenizer's bos and eos ids, or (None, None) if it cannot be loaded here."""
    from examples.llama3.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(config.tokenizer)
    except (OSError, ValueError, ImportError) as error:
        logger.warning("bos/eos token ids left out of config.json: %s", error)
        return None, None
    return tokenizer.bos_id, tokenizer.eos_id


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="export_hf.py", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a complete step_* checkpoint directory")
    parser.add_argument("out_dir", help="where model.safetensors and config.json are written")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    options = parser.parse_args(argv)
    config = checkpoint_config(options.checkpoint)
    dtype = getattr(torch, options.dtype) if options.dtype else None
    out = export_hf(options.checkpoint, options.out_dir, config, dtype, *token_ids(config))
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'}")
    return out


if __name__ == "__main__":
    try:
        main()
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        raise SystemExit(f"export_hf.py: error: {error}") from None
