"""Which ranks a hung job is waiting for, told from every rank's last :class:`RankRecord`.

A collective that times out names the rank that *waited*; the ones to look at are those that did
not arrive. :func:`ranks_behind` applies these tests in order, and the first that singles out
some ranks decides:

1. a rank with no record, or whose record is older than ``stale_after`` seconds (its process is
   gone, or frozen while holding the GIL so that its watchdog thread cannot write);
2. ranks at a lower step than the others;
3. ranks that have issued fewer collectives on a process group than another member of it (the
   others are waiting in a collective these ranks have not reached);
4. ranks in another phase than most ranks are in.

When none does, every rank is in the same place: a collective all of them entered (a deadlock
inside it, a broken link) or mismatched collectives; the flight recorder tells those apart.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from dream_trainer.world.rank_records import RankRecord

__all__ = ["Behind", "format_report", "ranks_behind"]


@dataclass(frozen=True)
class Behind:
    """A rank the others are waiting for, and why it is taken to be behind."""

    rank: int
    reason: str
    record: RankRecord | None


def _ranks(ranks: list[int] | set[int]) -> str:
    """``0-3,5,7-8``: ranks as ranges."""
    ordered = sorted(ranks)
    parts: list[str] = []
    start = prev = None
    for rank in [*ordered, None]:
        if rank is not None and prev is not None and rank == prev + 1:
            prev = rank
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = rank
    return ",".join(parts)


def _group(name: str, records: list[RankRecord]) -> str:
    for record in records:
        if name in record.groups:
            return f"{name} ({record.groups[name]})"
    return name


def ranks_behind(
    records: dict[int, RankRecord], world_size: int, now: float, stale_after: float
) -> list[Behind]:
    """The ranks that the others are waiting for (empty: none stands out); see the module doc."""
    gone = [
        Behind(rank, "it published no record (it never started its watchdog, or died first)", None)
        for rank in range(world_size)
        if rank not in records
    ]
    gone += [
        Behind(
            rank,
            f"its last record is {now - record.heartbeat:.0f} s old: its process is gone, or "
            "frozen while holding the GIL",
            record,
        )
        for rank, record in sorted(records.items())
        if now - record.heartbeat > stale_after
    ]
    if gone:
        return gone
    live = dict(sorted(records.items()))
    if not live:
        return []
    top = max(r.step for r in live.values())
    ahead = [rank for rank, r in live.items() if r.step == top]
    behind = [
        Behind(rank, f"it is at step {r.step} while rank(s) {_ranks(ahead)} reached step {top}", r)
        for rank, r in live.items()
        if r.step < top
    ]
    if behind:
        return behind
    by_rank: dict[int, list[str]] = defaultdict(list)
    members: dict[str, dict[int, int]] = defaultdict(dict)
    for rank, record in live.items():
        for name, issued in record.collectives.items():
            members[name][rank] = issued
    for name, counts in sorted(members.items()):
        most = max(counts.values())
        leaders = [rank for rank, n in counts.items() if n == most]
        for rank, n in counts.items():
            if n < most:
                by_rank[rank].append(
                    f"it issued {n} collective(s) on group {_group(name, list(live.values()))}, "
                    f"rank(s) {_ranks(leaders)} issued {most}: they wait in one it has not reached"
                )
    if by_rank:
        return [Behind(rank, "; ".join(why), live[rank]) for rank, why in sorted(by_rank.items())]
    phases = Counter(r.phase for r in live.values())
    (common, count), *others = phases.most_common()
    if others and count > len(live) - count:
        return [
            Behind(rank, f"it is in phase {r.phase!r} while most ranks are in {common!r}", r)
            for rank, r in live.items()
            if r.phase != common
        ]
    return []


def _where(record: RankRecord, now: float) -> str:
    return f"step {record.step}, phase {record.phase}, {record.seconds_in_phase(now):.1f} s in it"


def format_report(
    *,
    rank: int,
    reason: str,
    own: RankRecord,
    records: dict[int, RankRecord],
    world_size: int,
    now: float,
    stale_after: float,
    extra: Sequence[str] = (),
) -> str:
    """The hang report one rank writes: its own position, the ranks behind, every rank's place."""
    behind = ranks_behind(records, world_size, now, stale_after)
    lines = [
        f"hang report from rank {rank}: {reason}",
        f"  this rank: {_where(own, now)}",
    ]
    if behind:
        for item in behind[:16]:
            where = f" ({_where(item.record, now)})" if item.record is not None else ""
            lines.append(f"  did not arrive: rank {item.rank}{where}: {item.reason}")
        if len(behind) > 16:
            rest = _ranks([b.rank for b in behind[16:]])
            lines.append(f"  did not arrive: also rank(s) {rest}")
    else:
        places = {(r.step, r.phase) for r in records.values()}
        lines.append(
            "  did not arrive: no rank stands out"
            + (f" (all at step {own.step}, phase {own.phase})" if len(places) == 1 else "")
            + ": a collective every rank entered (a deadlock or broken link inside it) or "
            "mismatched collectives; see the flight recorder"
        )
    places_of: dict[tuple[int, str], list[int]] = defaultdict(list)
    for r, record in sorted(records.items()):
        places_of[(record.step, record.phase)].append(r)
    lines.append(f"  every rank ({len(records)} of {world_size} published a record):")
    for (step, phase), ranks in sorted(places_of.items()):
        lines.append(f"    rank(s) {_ranks(ranks)}: step {step}, phase {phase}")
    lines.extend(f"  {line}" for line in extra)
    return "\n".join(lines)
