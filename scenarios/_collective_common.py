"""Outcome and verdict helpers shared by the collective scenarios (000, 001, 003)."""

from __future__ import annotations

from typing import Any

from kvhandoff.scenarios._runner import Outcome, exc_outcome, short_site


def desync_outcome(result: Any) -> Outcome:
    """A rank's outcome; for a CollectiveDesyncError also the seq and each rank's call."""
    from kvhandoff.collectives import CollectiveDesyncError

    outcome = exc_outcome(result)
    if isinstance(result, CollectiveDesyncError):
        outcome["seq"] = result.seq
        outcome["calls"] = {r: f"{fp.op} at {short_site(fp.site)}"
                            for r, fp in sorted(result.table.items())}
    return outcome


def desync_lines(outcomes: dict[int, Outcome], size: int) -> tuple[bool, list[str]]:
    """Every rank raised CollectiveDesyncError at one seq, naming at least two call sites."""
    kinds = {o["kind"] for o in outcomes.values()}
    if kinds != {"CollectiveDesyncError"} or len(outcomes) != size:
        return False, [f"  rank {r}: {o['text']}" for r, o in sorted(outcomes.items())]
    first = outcomes[min(outcomes)]
    calls: dict[int, str] = first["calls"]
    by_call: dict[str, list[int]] = {}
    for rank, call in calls.items():
        by_call.setdefault(call, []).append(rank)
    lines = [f"CollectiveDesyncError on every rank at seq {first['seq']}:"]
    lines += [f"  ranks {ranks}: {call}" for call, ranks in sorted(by_call.items())]
    return len(by_call) >= 2, lines
