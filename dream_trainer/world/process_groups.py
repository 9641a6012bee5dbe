"""Process-group plumbing of the world: the store a restarted torchrun worker uses, the live
groups, and a clean teardown under gloo."""

from __future__ import annotations

import datetime
import hashlib
import os
import time
from typing import Any

import torch.distributed as dist

from dream_trainer.world.environment import LaunchEnvironment

__all__: list[str] = []  # internals of DistributedWorld


_GLOO_SETTLE_SECONDS = 0.05


def let_gloo_workers_settle() -> None:
    """Release the GIL for a moment so gloo's worker threads finish freeing their last work.

    A gloo worker frees the tensors of a collective *after* signalling its completion; when
    Python has already dropped them, that needs the GIL. ``destroy_process_group`` does not stop
    these threads (they end only with the group's C++ object, which the models' FSDP state keeps
    alive until interpreter exit), and a worker that asks for the GIL once the interpreter is
    finalizing is ended by ``pthread_exit`` inside a ``noexcept`` destructor: ``terminate called
    without an active exception`` and SIGABRT after a clean ``fit()``. Sleeping after the barrier
    hands the GIL and a CPU to any worker still releasing, so none is left for finalization.
    """
    time.sleep(_GLOO_SETTLE_SECONDS)


def registered_groups() -> list[Any]:
    """Every live process group, oldest first (torch's private registry; empty if it is missing)."""
    pg_map = getattr(getattr(dist.distributed_c10d, "_world", None), "pg_map", None)
    if pg_map is None or not dist.is_initialized():
        return []
    return list(pg_map)


def restart_attempt_store(env: LaunchEnvironment, timeout: datetime.timedelta) -> Any:
    """A client of torchrun's agent store whose keys are private to this restart attempt.

    The agent's store outlives a restart, and gloo publishes each rank's address under the same
    keys in every attempt: a restarted rank can read a dead peer's address from the attempt before
    and fail with "connection refused". A prefix per attempt keeps the attempts apart. None when
    this is not a restartable torchrun worker (then ``env://`` is right).
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if env.source != "torchrun" or attempt is None:
        return None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    client = dist.TCPStore(
        env.master_addr, env.master_port, is_master=False, timeout=timeout, wait_for_workers=False
    )
    return dist.PrefixStore(f"dream_trainer/attempt_{attempt}", client)


_UNTAGGED: list[str] = []  # the user's own cache_key_tag, while ours is set


def tag_compile_caches_with_groups() -> None:
    """Key torch.compile's on-disk caches (Inductor's FX graph cache, AOTAutograd's cache) by
    this process's process groups.

    Compiled collectives name their group ("0", "1", ...: the order of creation), but the
    cache keys do not say which ranks a name stood for. A run that creates its groups in
    another order (another layout, checkpointing on or off, a test process that made groups
    before) would load code whose collectives go to the wrong group or to none ("Could not
    resolve the process group registered under the name ..."), and train to wrong numbers.
    The tag lists every live group's name, backend and ranks, so only a run with the same
    groups shares cache entries. Call it once every group exists, before the first compile.
    """
    config = _compiler_config()
    if config is None:
        return
    groups = []
    for group in registered_groups():
        try:
            ranks = dist.get_process_group_ranks(group)
        except (RuntimeError, ValueError):  # pragma: no cover - a group being destroyed
            continue
        name = getattr(group, "group_name", "?")
        groups.append(f"{name}:{dist.get_backend(group)}:{','.join(map(str, ranks))}")
    digest = hashlib.sha256(";".join(sorted(groups)).encode()).hexdigest()[:16]
    if not _UNTAGGED:
        _UNTAGGED.append(config.cache_key_tag)
    user = _UNTAGGED[0]
    config.cache_key_tag = (
        f"{user}|dream_trainer_groups={digest}" if user else f"dream_trainer_groups={digest}"
    )


def untag_compile_caches() -> None:
    """Put back the cache tag that was set before :func:`tag_compile_caches_with_groups`."""
    config = _compiler_config()
    if config is not None and _UNTAGGED:
        config.cache_key_tag = _UNTAGGED.pop()


def _compiler_config() -> Any:
    try:
        import torch.compiler.config as config
    except ImportError:  # pragma: no cover - torch without the compiler config module
        return None
    return config if hasattr(config, "cache_key_tag") else None
