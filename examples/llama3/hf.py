"""Hugging Face ``LlamaForCausalLM`` names and layout for this example's Transformer, both ways.

Our RoPE rotates adjacent channel pairs (Meta's layout); Hugging Face's rotates the two halves
of each head, so the rows of ``wq``/``wk`` are permuted on export and permuted back on import.
:func:`export_hf` writes ``model.safetensors`` and ``config.json`` that
``transformers.LlamaForCausalLM.from_pretrained(out_dir)`` loads.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dream_trainer.trainer.checkpointing.export import export_safetensors
from dream_trainer.trainer.checkpointing.safe_io import SafeReader
from examples.llama3.configs import LlamaArgs

__all__ = ["export_hf", "from_hf", "hf_config", "looks_like_hf", "to_hf"]

_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_BACK = {hf: ours for ours, hf in _TOP.items()}
_BLOCK_BACK = {hf: ours for ours, hf in _BLOCK.items()}
_OURS_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _heads(name: str, args: LlamaArgs) -> int | None:
    """Heads of a q/k projection (whose rows RoPE pairs up), else None."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    return args.n_kv_heads if name.endswith("attention.wk.weight") else None


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head from adjacent pairs (0,1),(2,3),... to halves (0..d/2-1 | d/2..d-1)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_to_hf`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_rename(args: LlamaArgs) -> Callable[[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``rename`` for :func:`export_safetensors`: one of our tensors as its HF entry (none for
    the output of tied embeddings, which HF leaves out)."""

    def rename(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if name == "output.weight" and args.tie_embeddings:
            return {}
        if name in _TOP:
            return {_TOP[name]: tensor}
        match = _OURS_LAYER.fullmatch(name)
        if match is None or match[2] not in _BLOCK:
            raise KeyError(f"{name!r} has no Hugging Face LlamaForCausalLM counterpart")
        heads = _heads(name, args)
        value = permute_to_hf(tensor, heads) if heads else tensor
        return {f"model.layers.{match[1]}.{_BLOCK[match[2]]}": value}

    return rename


def to_hf(state: dict[str, torch.Tensor], args: LlamaArgs) -> dict[str, torch.Tensor]:
    """Our state dict under HF ``LlamaForCausalLM`` names and layout."""
    rename = hf_rename(args)
    return {k: v for name, tensor in state.items() for k, v in rename(name, tensor).items()}


def from_hf(state: dict[str, torch.Tensor], args: LlamaArgs) -> dict[str, torch.Tensor]:
    """An HF ``LlamaForCausalLM`` state dict under our names and layout; names it does not know
    are kept as they are (so a strict load reports them), RoPE ``inv_freq`` buffers dropped."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        match = _HF_LAYER.fullmatch(name)
        if name in _TOP_BACK:
            name = _TOP_BACK[name]
        elif match is not None and match[2] in _BLOCK_BACK:
            name = f"layers.{match[1]}.{_BLOCK_BACK[match[2]]}"
            heads = _heads(name, args)
            tensor = permute_from_hf(tensor, heads) if heads else tensor
        out[name] = tensor
    if args.tie_embeddings and "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def looks_like_hf(state: dict[str, Any]) -> bool:
    """Whether ``state``'s names are HF ``LlamaForCausalLM``'s rather than ours."""
    return any(k.startswith("model.") or k == "lm_head.weight" for k in state)


def hf_config(
    args: LlamaArgs,
    torch_dtype: torch.dtype | str = "float32",
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of an HF ``LlamaForCausalLM`` with ``args``' shapes."""
    scaling = args.rope_scaling
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "num_hidden_layers": args.n_layers,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "rope_scaling": None
        if scaling is None
        else {
            "rope_type": "llama3",
            "factor": scaling.scale_factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        },
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": str(torch_dtype).removeprefix("torch."),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }


def export_hf(
    checkpoint_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: Any,
    dtype: torch.dtype | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Path:
    """Write the checkpoint's model as ``out_dir/model.safetensors`` and ``config.json``.

    ``config`` is the run's ``LlamaArgs``, or a config with ``model_args()`` (``Llama3Config``);
    ``dtype`` casts the weights (default: as saved). Returns ``out_dir``.
    """
    args: LlamaArgs = config.model_args() if hasattr(config, "model_args") else config
    out = Path(out_dir)
    export_safetensors(
        checkpoint_path, out / "model.safetensors", dtype=dtype, rename=hf_rename(args)
    )
    if dtype is None:  # as saved: the dtype of the final norm's weight
        meta = SafeReader(str(checkpoint_path)).read_metadata().state_dict_metadata
        dtype = meta["models.model.norm.weight"].properties.dtype  # type: ignore[union-attr]
    text = json.dumps(hf_config(args, dtype, bos_token_id, eos_token_id), indent=2)
    (out / "config.json").write_text(text + "\n", encoding="utf-8")
    return out
