"""Cut a model into pipeline stages that keep the unsplit model's parameter names.

A stage is a deep copy of the (meta) model with what the stage does not own removed: blocks
leave their ``nn.ModuleDict`` (a ``nn.ModuleList`` becomes a :class:`SparseModuleList` keyed
by the original indices), other modules are set to ``None``. So ``layers.5.attention.wq.weight``
has that name on whichever stage holds it, and a checkpoint written under one pipeline layout
loads under another. The model's ``forward`` must skip modules that are ``None`` (the Llama 3
example does: ``h = self.tok_embeddings(x) if self.tok_embeddings is not None else x``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence

from torch import nn

__all__ = ["SparseModuleList", "balanced_stages", "split_model", "stage_modules"]


class SparseModuleList(nn.ModuleDict):
    """The blocks of a ``ModuleList`` one stage holds, keyed by their index in the full list.

    Iterating yields the blocks in order, as iterating the list did; indexing by a position
    the stage does not hold raises ``KeyError``.
    """

    def __iter__(self) -> Iterator[nn.Module]:  # type: ignore[override]
        return iter(self._modules.values())  # type: ignore[arg-type]

    def __getitem__(self, key: int | str) -> nn.Module:  # type: ignore[override]
        try:
            return self._modules[str(key)]  # type: ignore[return-value]
        except KeyError:
            raise KeyError(
                f"block {key} is not on this pipeline stage (it holds blocks "
                f"{list(self._modules)}); iterate the blocks instead of indexing them"
            ) from None


def block_container(model: nn.Module) -> str:
    """Name of the model's one ``nn.ModuleList`` / ``nn.ModuleDict`` child holding its blocks."""
    found = [n for n, c in model.named_children() if isinstance(c, (nn.ModuleList, nn.ModuleDict))]
    if len(found) != 1:
        what = "no nn.ModuleList / nn.ModuleDict child" if not found else f"several: {found}"
        raise ValueError(
            f"{type(model).__name__} has {what}, so its blocks cannot be split into pipeline "
            "stages automatically; give pipeline_parallel_config.split_points (the module names "
            "of each stage) or override apply_pipeline_parallel"
        )
    return found[0]


def balanced_stages(
    model: nn.Module, num_stages: int, first_weight: float = 1.0, last_weight: float = 1.0
) -> list[list[str]]:
    """Module names per stage: contiguous runs of blocks, as even as possible.

    Children registered before the block container (the embedding) go to the first stage and
    count as ``first_weight`` blocks; children after it (final norm, head) go to the last stage
    and count as ``last_weight``.
    """
    container = block_container(model)
    names = [n for n, _ in model.named_children()]
    before = [n for n in names[: names.index(container)] if _has_parameters(model, n)]
    after = [n for n in names[names.index(container) + 1 :] if _has_parameters(model, n)]
    blocks = [f"{container}.{key}" for key, _ in getattr(model, container).named_children()]
    if num_stages > len(blocks):
        raise ValueError(
            f"{num_stages} pipeline stages need at least {num_stages} blocks, but "
            f"{type(model).__name__}.{container} has {len(blocks)}; lower pipeline_parallel or "
            "stages_per_rank, or use a model with more layers"
        )
    counts = _balanced_counts(
        len(blocks), num_stages, first_weight if before else 0.0, last_weight if after else 0.0
    )
    stages, start = [], 0
    for index, count in enumerate(counts):
        stage = blocks[start : start + count]
        start += count
        if index == 0:
            stage = before + stage
        if index == num_stages - 1:
            stage = stage + after
        stages.append(stage)
    return stages


def _balanced_counts(blocks: int, stages: int, first: float, last: float) -> list[int]:
    """Blocks per stage (each at least 1): the lightest heaviest stage, then the most even."""

    def extra(s: int) -> float:
        return (first if s == 0 else 0.0) + (last if s == stages - 1 else 0.0)

    def best(cost: Callable[[float], float], limit: float) -> tuple[float, list[int]]:
        # table[s][b]: cheapest (cost, counts) for stages 0..s-1 holding the first b blocks,
        # with every stage's weight at most ``limit``; cost adds up per stage.
        inf: tuple[float, list[int]] = (float("inf"), [])
        table: list[list[tuple[float, list[int]]]] = [
            [inf] * (blocks + 1) for _ in range(stages + 1)
        ]
        table[0][0] = (0.0, [])
        for s in range(stages):
            for b in range(s, blocks - (stages - s) + 1):
                done, counts = table[s][b]
                if done == float("inf"):
                    continue
                for count in range(1, blocks - b - (stages - s - 1) + 1):
                    weight = count + extra(s)
                    if weight > limit:
                        break
                    candidate = (done + cost(weight), [*counts, count])
                    if candidate[0] < table[s + 1][b + count][0]:
                        table[s + 1][b + count] = candidate
        return table[stages][blocks]

    weights = sorted({c + extra(s) for s in range(stages) for c in range(1, blocks + 1)})
    heaviest = next(w for w in weights if best(lambda _: 0.0, w)[0] == 0.0)
    return best(lambda w: w * w, heaviest)[1]


def _has_parameters(model: nn.Module, name: str) -> bool:
    child = getattr(model, name)
    return child is not None and any(True for _ in child.parameters())


def stage_modules(model: nn.Module, stages: Sequence[Sequence[str]]) -> list[set[str]]:
    """Check that ``stages`` (module or parameter names) own every parameter exactly once."""
    module_names = {n for n, _ in model.named_modules()}
    param_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for index, stage in enumerate(stages):
        unknown = [n for n in stage if n not in module_names and n not in param_names]
        if unknown:
            raise ValueError(
                f"pipeline stage {index} names {unknown}, which are neither modules nor "
                f"parameters of {type(model).__name__}; use names from model.named_modules()"
            )
    owners: dict[str, list[int]] = {}
    for name in param_names:
        owners[name] = [i for i, stage in enumerate(stages) if any(_within(name, k) for k in stage)]
    lost = [n for n, o in owners.items() if not o]
    if lost:
        raise ValueError(
            f"the pipeline split leaves {_count(lost)} on no stage (first: {lost[:3]}); "
            "every parameter must belong to exactly one stage: add their modules to "
            "split_points"
        )
    twice = {n: o for n, o in owners.items() if len(o) > 1}
    if twice:
        name, where = next(iter(twice.items()))
        raise ValueError(
            f"the pipeline split puts {_count(twice)} on several stages ({name!r} on "
            f"stages {where}); each stage would train its own copy: list each module in one "
            "stage only"
        )
    _refuse_ties_across_stages(model, owners)
    return [set(stage) for stage in stages]


def _refuse_ties_across_stages(model: nn.Module, owners: dict[str, list[int]]) -> None:
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    for names in by_tensor.values():
        stages_of = {owners[n][0] for n in names}
        if len(stages_of) > 1:
            raise ValueError(
                f"{' and '.join(names)} are one tied parameter, but the pipeline split puts them "
                f"on stages {sorted(stages_of)}: each stage would train its own copy. Untie them "
                "(for Llama 3: model_overrides.tie_embeddings=false) or keep both on one stage "
                "with split_points"
            )


def _count(items: object) -> str:
    n = len(items)  # type: ignore[arg-type]
    return f"{n} parameter" if n == 1 else f"{n} parameters"


def _within(name: str, owner: str) -> bool:
    return name == owner or name.startswith(owner + ".")


def split_model(model: nn.Module, keep: set[str]) -> nn.Module:
    """A deep copy of ``model`` holding only the modules and parameters named in ``keep``.

    Everything with no parameters (activations, the root's buffers) stays on every stage.
    """
    return _pruned(copy.deepcopy(model), "", keep)


def _pruned(module: nn.Module, prefix: str, keep: set[str]) -> nn.Module:
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        if any(_within(path, k) for k in keep) or not any(True for _ in child.parameters()):
            continue  # kept whole, or holds no parameters
        if any(_within(k, path) for k in keep):
            replacement = _pruned(child, f"{path}.", keep)
            if replacement is not child:
                module._modules[name] = replacement
        else:
            _remove(module, name)
    for name, _ in list(module.named_parameters(recurse=False)):
        if not any(_within(f"{prefix}{name}", k) for k in keep):
            module.register_parameter(name, None)
    if isinstance(module, nn.ModuleList):
        sparse = SparseModuleList({n: c for n, c in module._modules.items() if c is not None})
        sparse.__dict__["pruned_names"] = {n for n, c in module._modules.items() if c is None}
        return sparse
    return module


def _remove(module: nn.Module, name: str) -> None:
    """Drop a child this stage does not hold, remembering its name (plans may mention it)."""
    if isinstance(module, nn.ModuleDict):
        del module._modules[name]
        module.__dict__["pruned_names"] = {*getattr(module, "pruned_names", ()), name}
    elif isinstance(module, nn.ModuleList):
        module._modules[name] = None  # type: ignore[assignment]  # dropped when it turns sparse
    else:
        setattr(module, name, None)
