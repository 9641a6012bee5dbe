"""Continue token sequences with the Llama 3 model of a trainer, on every rank of a replica."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor


@torch.no_grad()
def continue_ids(
    trainer: Any,
    ids: list[int],
    max_new_tokens: int,
    *,
    greedy: bool = False,
    temperature: float = 0.8,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    fixed_steps: bool = False,
) -> list[int]:
    """``ids`` followed by up to ``max_new_tokens`` new ids (greedy, or sampled with ``generator``).

    Sharded forwards need every rank of the replica, so all of them call this alike.
    ``fixed_steps`` runs all ``max_new_tokens`` forwards even after ``eos_id`` (dropping what
    follows it): under FSDP every data-parallel rank must run as many forwards.
    """
    model = trainer.model
    world = trainer.world
    seq_len = trainer.config.seq_len
    out = list(ids)
    stopped = False
    for _ in range(max_new_tokens):
        window = out[-seq_len:]
        # Right padding is invisible to causal attention; it keeps the length divisible for SP,
        # and at the training length under pipeline parallelism (stages have fixed shapes).
        length = seq_len if world.pp_enabled else len(window)
        padded = window + [0] * (length - len(window))
        padded += [0] * (-len(padded) % world.tp_size)
        tokens = torch.tensor([padded], device=trainer.device)
        logits = trainer.forward_outputs(model, tokens)
        if isinstance(logits, DTensor):
            logits = logits.full_tensor()
        last = logits[0, len(window) - 1].float().cpu()
        if greedy:
            next_id = int(torch.argmax(last))
        else:
            probs = torch.softmax(last / temperature, dim=-1)
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        if stopped:
            continue
        if next_id == eos_id:
            if not fixed_steps:
                break
            stopped = True
            continue
        out.append(next_id)
    return out
