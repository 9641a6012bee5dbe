"""An analytic estimate of the activations a decoder-only transformer keeps for backward.

Counted per token, for the tensors eager PyTorch saves (measured against a CPU run of the Llama 3
example in ``tests/test_planner_activations.py``; the formulas are in docs/scaling.md). ``e`` is
the bytes of the compute dtype, ``h`` the model width, ``f`` the feed-forward width, ``H`` and
``G`` the query and key/value heads of width ``d``, ``V`` the vocabulary, ``t`` the
tensor-parallel degree and ``c`` the context-parallel degree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dream_trainer.configs.device import V_SHAPED_SCHEDULES


@dataclass(frozen=True)
class TransformerShape:
    """The shape of a decoder-only transformer and of its batches, for the activation estimate.

    A trainer gives it to the planner from a ``transformer_shape()`` method (see
    docs/scaling.md); without one the planner reports no activations.
    """

    dim: int
    """Model width ``h``."""
    ffn_dim: int
    """Hidden width ``f`` of the (gated, SwiGLU) feed-forward: three ``h x f`` projections."""
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    seq_len: int
    """Tokens per sequence (before context parallelism cuts it)."""
    batch_size: int
    """Sequences per step on each data-parallel rank (pipeline parallelism cuts it into
    microbatches)."""
    sequence_parallel: bool = True
    """Under tensor parallelism the norms run on sequence shards (Megatron-style SP)."""

    def __post_init__(self) -> None:
        for name in ("dim", "ffn_dim", "n_heads", "n_kv_heads", "head_dim", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransformerShape.{name} must be positive, got {self}")
        if self.seq_len < 1 or self.batch_size < 1:
            raise ValueError(
                f"TransformerShape needs seq_len and batch_size >= 1, got seq_len={self.seq_len}, "
                f"batch_size={self.batch_size}"
            )


@dataclass(frozen=True)
class ActivationSettings:
    """How one rank runs the blocks: parallel degrees, precision, checkpointing, pipeline."""

    compute_bytes: int
    """Bytes of an activation element: ``param_dtype``, else the stored parameters' dtype."""
    tp: int = 1
    cp: int = 1
    cp_method: str = "allgather"
    loss_parallel: bool = False
    checkpoint: bool = False
    checkpoint_mode: str = "full"
    """``full`` keeps a checkpointed block's input only; ``selective`` also its matmul,
    attention and reduce-scatter outputs (``activation_checkpoint_config.mode``)."""
    checkpoint_every: int = 1
    """Every ``n``-th block of a stage is checkpointed, from the first (``every_n_blocks``)."""
    microbatches: int = 1
    schedule_states: tuple[tuple[int, int, int], ...] = ((1, 0, 0),)
    """(stage-microbatches in flight, of them awaiting their weight gradient, of those the
    last stage's) after each step of the schedule (see :func:`in_flight_microbatches`); one
    in flight without pipelining."""
    blocks_per_stage: float = 0.0
    """Blocks in one of this rank's stages (all blocks without pipelining)."""
    has_head: bool = True
    """This rank computes the final norm, the output projection and the loss."""
    head_in_flight: int = 1
    """Microbatches whose head activations the last stage holds at once."""
    logits_held: int = 1
    """Microbatches whose logits are held: all of them under pipelining (torch's last stage
    keeps every microbatch's output until the step ends), else 1."""
    pipeline_buffers: int = 0
    """Microbatch x stage pairs whose sent activations and received gradients the schedule
    keeps for the step (every microbatch of each stage that is not the last)."""


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes of activations on one rank, by part; :attr:`total` is their peak."""

    blocks: int
    """Tensors the in-flight blocks keep for backward (only their inputs under checkpointing)."""
    head: int
    """Final norm, logits and log-softmax kept for backward (last stage only)."""
    loss: int
    """Temporaries as backward starts: the gradients of the log-softmax and of the logits."""
    backward: int
    """Temporaries while one block runs backward: its recomputed activations under
    checkpointing, and its gradients."""
    logits: int
    """Of ``head``, the logits, which are held until backward ends."""
    buffers: int
    """The pipeline schedule's activations sent and gradients received."""
    tokens: int
    """Tokens of one microbatch on this rank (after context parallelism)."""

    @property
    def total(self) -> int:
        """The peak: as backward starts (the loss), or while a block runs backward."""
        at_loss = self.blocks + self.head + self.loss if self.head else 0
        in_block = self.blocks + self.logits + self.backward
        return self.buffers + max(at_loss, in_block)


def block_bytes_per_token(shape: TransformerShape, s: ActivationSettings) -> float:
    """Bytes one block keeps for backward per token of its (context-parallel) sequence shard:

    ``2 [(4 + e) h / t_n + 4 / t_n + e h] + A + 4 e f / t``

    two norms (the fp32 input, 1/rms, the normalized input, and the output the projections
    read: gathered to the whole sequence under SP, so not divided by ``t``), the attention
    ``A`` and the four ``f``-wide tensors of the gated MLP; ``t_n`` is ``t`` under sequence
    parallelism, else 1. Without context parallelism, or when it all-gathers keys and values,
    ``A = e (2 H d + 2 G d k) / t + 4 H / t``: the rotated queries and keys, the values, the
    attention output and its log-sum-exp, with ``k = c`` gathered key/value copies (else 1).
    The ring (``alltoall``) checkpoints each of its ``c`` steps, keeping the step's keys and
    values, output and log-sum-exp, and the fp32 merge of the partial outputs:
    ``A = [e H d + c (2 e G d + e H d + 4 H) + (c - 1)(4 H d + 12 H)] / t``.
    """
    e, t, h = s.compute_bytes, s.tp, shape.dim
    tn = t if shape.sequence_parallel else 1
    q, kv, heads = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim, shape.n_heads
    norms = 2 * ((4 + e) * h / tn + 4 / tn + e * h)
    c = s.cp
    if c > 1 and s.cp_method == "alltoall":
        steps = c * (2 * e * kv + e * q + 4 * heads) + (c - 1) * (4 * q + 12 * heads)
        attention = (e * q + steps) / t
    else:
        gathered = c if c > 1 else 1
        attention = e * (2 * q + 2 * kv * gathered) / t + 4 * heads / t
    return norms + attention + 4 * e * shape.ffn_dim / t


def checkpointed_bytes_per_token(shape: TransformerShape, s: ActivationSettings) -> float:
    """What a checkpointed block keeps per token: its input, ``e h / t_n``; selectively
    checkpointed, also the matmul outputs (``e (H d + 2 G d + 2 f) / t`` for the column-wise
    ones and ``2 e h`` for the row-wise ones, before their reduce-scatter), the reduce-scatter
    outputs under TP (``2 e h / t``) and the attention output and log-sum-exp
    (``e H d / t + 4 H / t``)."""
    e, t, h = s.compute_bytes, s.tp, shape.dim
    tn = t if shape.sequence_parallel else 1
    kept = e * h / tn
    if s.checkpoint_mode != "selective":
        return kept
    q, kv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    columns = e * (q + 2 * kv + 2 * shape.ffn_dim) / t
    rows = 2 * e * h + (2 * e * h / t if t > 1 else 0)
    return kept + columns + rows + e * q / t + 4 * shape.n_heads / t


def attention_extra_bytes(shape: TransformerShape, s: ActivationSettings, batch: int) -> float:
    """Bytes per block and microbatch that grow with the sequence squared (context parallel):
    the boolean masks kept for backward, ``S_c x S`` (all-gather) or ``c`` of ``S_c x S_c``
    (ring). They are per microbatch, not per sequence: one mask serves the whole batch."""
    if s.cp == 1:
        return 0.0
    local = shape.seq_len // s.cp
    return float(local * shape.seq_len if s.cp_method == "allgather" else s.cp * local * local)


def attention_backward_bytes(shape: TransformerShape, s: ActivationSettings) -> float:
    """Per token, what the ring recomputes for one step's backward: the scores, their
    log-sum-exp input and exponent in fp32 and the weights in ``e``, ``(12 + e) H S_c / t``;
    0 for the fused attention of the other layouts."""
    if s.cp == 1 or s.cp_method != "alltoall":
        return 0.0
    return (12 + s.compute_bytes) * shape.n_heads / s.tp * (shape.seq_len // s.cp)


def head_bytes_per_token(
    shape: TransformerShape, s: ActivationSettings
) -> tuple[float, float, float]:
    """(kept, of which logits, temporary) bytes per token of the final norm, logits and loss.

    Kept: the norm as in a block, the logits (held until backward ends) and the fp32
    log-softmax, ``(4 + e) h / t_n + 4 / t_n + e h + (e + 4) V'``. Temporary as backward
    starts: the fp32 gradients of the log-softmax output and of its input, ``8 V'``. ``V'`` is
    ``V / t`` under loss parallelism, else ``V``.
    """
    e, h = s.compute_bytes, shape.dim
    tn = s.tp if shape.sequence_parallel else 1
    vocab = shape.vocab_size / s.tp if s.loss_parallel and s.tp > 1 else shape.vocab_size
    kept = (4 + e) * h / tn + 4 / tn + e * h + (e + 4) * vocab
    return kept, e * vocab, 8 * vocab


def estimate_activations(shape: TransformerShape, s: ActivationSettings) -> ActivationEstimate:
    """The activations of one rank: in-flight microbatches times its stages' blocks, the head
    and the loss on the last stage, the pipeline's buffers; see :attr:`ActivationEstimate.total`.

    A block's backward adds its gradient temporaries, about ``2 e f / t`` per token (the gated
    MLP's two ``f``-wide input gradients), and under checkpointing its recomputed activations.
    Under a zero-bubble schedule a block awaiting its weight gradient also keeps its
    projections' output gradients, ``e (H d + 2 G d + 2 h + 2 f) / t`` per token.
    The pipeline keeps ``2 e h / t_n`` per token for each of :attr:`~ActivationSettings.
    pipeline_buffers`.
    """
    if shape.batch_size % s.microbatches:
        raise ValueError(
            f"the batch of {shape.batch_size} sequences cannot be cut into {s.microbatches} "
            "pipeline microbatches; make batch_size a multiple of num_microbatches"
        )
    batch = shape.batch_size // s.microbatches
    tokens = batch * shape.seq_len // s.cp
    e, tn = s.compute_bytes, s.tp if shape.sequence_parallel else 1
    per_block = block_bytes_per_token(shape, s) * tokens + attention_extra_bytes(shape, s, batch)
    checkpointed = math.ceil(s.blocks_per_stage / s.checkpoint_every) if s.checkpoint else 0
    recomputed = checkpointed * checkpointed_bytes_per_token(shape, s) * tokens
    # A stage-microbatch: its checkpointed blocks' inputs (and saved outputs), the others whole.
    kept = recomputed + (s.blocks_per_stage - checkpointed) * per_block
    # Zero-bubble schedules split backward: until its weight gradient runs, a block keeps
    # (recomputed) activations and the gradients of its projections' outputs.
    q, kv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    weight_grads = e * (q + 2 * kv + 2 * shape.dim + 2 * shape.ffn_dim) / s.tp * tokens
    pending = s.blocks_per_stage * (weight_grads + per_block) - kept
    # The last stage's pending weight gradient also keeps the logits' gradient.
    _, held_per_token, _ = head_bytes_per_token(shape, s)
    blocks = max(
        live * kept + waiting * pending + last * held_per_token * tokens
        for live, waiting, last in s.schedule_states
    )
    grads = 2 * e * shape.ffn_dim / s.tp + attention_backward_bytes(shape, s)
    backward = grads * tokens if s.blocks_per_stage else 0.0
    if checkpointed:
        backward += per_block
    head = logits = loss = 0.0
    if s.has_head:
        kept, held, temporary = head_bytes_per_token(shape, s)
        logits = s.logits_held * held * tokens
        head = s.head_in_flight * (kept - held) * tokens + logits
        loss = temporary * tokens
    buffers = s.pipeline_buffers * 2 * e * shape.dim / tn * tokens
    return ActivationEstimate(
        blocks=round(blocks),
        head=round(head),
        loss=round(loss),
        backward=round(backward),
        logits=round(logits),
        buffers=round(buffers),
        tokens=tokens,
    )


def in_flight_microbatches(
    schedule: str, pp_rank: int, pp: int, microbatches: int, stages_per_rank: int
) -> list[tuple[int, int, int]]:
    """The states of rank ``pp_rank`` under torch's schedule ``schedule``: after each action,
    (stage-microbatches forwarded and not yet backward, of them those whose input gradient is
    done but whose weight gradient is still pending (zero-bubble schedules), of those the
    ones of the last stage).

    The runtime schedules' order is torch's own (``_calculate_single_rank_operations``); GPipe
    runs every forward first (``m`` in flight), 1F1B holds ``min(m, p - r)``.
    """
    m = microbatches
    if schedule == "GPipe":
        return [(m, 0, 0)]
    if schedule == "1F1B":
        return [(min(m, pp - pp_rank), 0, 0)]
    order = _torch_order(schedule, pp_rank, pp, m, stages_per_rank)
    if order is None:  # a torch without the schedule's order: the warmup formula
        return [(_warmup_formula(schedule, pp_rank, pp, m, stages_per_rank), 0, 0)]
    last = pp * stages_per_rank - 1
    live: set[tuple[int, int]] = set()
    pending: set[tuple[int, int]] = set()
    states = []
    for kind, key in order:
        if kind == "F":
            live.add(key)
        elif kind == "I":
            pending.add(key)
        elif kind in ("B", "W"):
            live.discard(key)
            pending.discard(key)
        states.append((len(live), len(pending), sum(stage == last for stage, _ in pending)))
    return states


def _torch_order(
    schedule: str, pp_rank: int, pp: int, m: int, v: int
) -> list[tuple[str, tuple[int, int]]] | None:
    """(F/I/W/B, (stage, microbatch)) in the order torch's schedule runs them on the rank."""
    from types import SimpleNamespace

    from torch.distributed.pipelining import schedules

    if schedule == "LoopedBFS":  # every stage's forwards, then the backwards in reverse
        return [("F", (s, i)) for s in range(v) for i in range(m)] + [
            ("B", (s, i)) for s in reversed(range(v)) for i in range(m)
        ]
    cls = getattr(schedules, f"Schedule{schedule}", None)
    compute = getattr(cls, "_calculate_single_rank_operations", None)
    if compute is None:
        return None
    rounds = max(1, m // pp)
    fields = dict(
        pp_group_size=pp,
        n_local_stages=v,
        _n_microbatches=m,
        number_of_rounds=rounds,
        microbatches_per_round=m // rounds,
        num_stages=pp * v,
        _num_stages=pp * v,
        rank=pp_rank,
    )
    try:
        actions = compute(SimpleNamespace(**fields), pp_rank)
    except Exception:  # pragma: no cover - torch changed the schedule's internals
        return None
    names = {"FORWARD": "F", "BACKWARD_INPUT": "I", "BACKWARD_WEIGHT": "W", "FULL_BACKWARD": "B"}
    order = []
    for action in actions:
        if action is None:
            continue
        for part in action.sub_actions or (action,):
            kind = names.get(part.computation_type.name)
            if kind is not None:
                order.append((kind, (part.stage_index, part.microbatch_index)))
    return order


def _warmup_formula(schedule: str, pp_rank: int, pp: int, m: int, v: int) -> int:
    if schedule in V_SHAPED_SCHEDULES:
        return min(2 * pp, 2 * m)
    rounds = max(1, m // pp)
    factor = 2 if schedule == "Interleaved1F1B" else 1
    return min((v - 1) * (m // rounds) + factor * (pp - 1 - pp_rank) + 1, m * v)
