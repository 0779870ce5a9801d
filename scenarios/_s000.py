"""Seed 000 (TensorRT-LLM PR 14560): an allgather of timed-out requests issued inside a
rank-divergent gate (only ranks that had timeouts this iteration), followed by the loop's
regular state allgather. The ranks that skipped the gate match their state gather with their
peers' timeout gather: each side decodes the other's payload, and every rank dies with a
TypeError, as in the field. Checked: CollectiveDesyncError on every rank, naming both call
sites. Fixed: the timeouts go into a ``SymmetricOutbox`` flushed at a point every rank
reaches every iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvhandoff.scenarios._collective_common import desync_lines, desync_outcome
from kvhandoff.scenarios._runner import CollectiveScenario, Hung, Outcome, Verdict

ITERATIONS = 4


@dataclass
class RankState:
    """What the state gather carries per rank (decoded as ``RankState(*payload)``)."""

    rank: int
    iteration: int
    active: int
    free_blocks: int
    step_ms: float


@dataclass
class TimeoutBatch:
    """What the timeout gather carries per rank (decoded as ``TimeoutBatch(*payload)``)."""

    rank: int
    first_request: int
    count: int


def has_timeouts(rank: int, iteration: int, seed: int) -> bool:
    """Rank-local: on one iteration (chosen by the seed) half the ranks had timeouts."""
    return iteration == 1 + seed % (ITERATIONS - 1) and (rank + seed) % 2 == 0


def loop(comm: Any, mode: str, seed: int) -> dict[str, int]:
    """One rank's executor loop; returns what it handled."""
    outbox = None
    if mode == "fixed":
        from kvhandoff.collectives import SymmetricOutbox

        outbox = SymmetricOutbox(comm)
    handled = {"states": 0, "timeouts": 0}
    for iteration in range(ITERATIONS):
        if has_timeouts(comm.rank, iteration, seed):  # rank-divergent gate
            payload = (comm.rank, 100 * iteration, 1 + comm.rank)
            if outbox is not None:
                outbox.put(payload)
            else:
                gathered = comm.allgather(payload)
                handled["timeouts"] += len([TimeoutBatch(*p) for p in gathered])
        if outbox is not None:  # rank-symmetric: every rank, every iteration
            for items in outbox.flush():
                handled["timeouts"] += len([TimeoutBatch(*p) for p in items])
        state = (comm.rank, iteration, 3, 40 - iteration, 12.5)
        states = [RankState(*p) for p in comm.allgather(state)]
        handled["states"] += len(states)
    return handled


def judge(mode: str, outcomes: dict[int, Outcome], hung: dict[int, Hung]) -> Verdict:
    size = 4
    if hung:
        return Verdict(False, [f"unexpected hang of ranks {sorted(hung)}"])
    if mode == "unsafe":
        ok = len(outcomes) == size and all(o["kind"] == "TypeError" for o in outcomes.values())
        lines = ["TypeError on every rank (misaligned payload reached the wrong call):"
                 if ok else "expected a TypeError on every rank:"]
        lines += [f"  rank {r}: {o['text']}" for r, o in sorted(outcomes.items())]
        return Verdict(ok, lines)
    if mode == "checked":
        ok, lines = desync_lines(outcomes, size)
        return Verdict(ok, lines)
    ok = len(outcomes) == size and all(o["kind"] == "ok" for o in outcomes.values())
    text = outcomes[0]["text"] if outcomes else ""
    return Verdict(ok, [f"completed {ITERATIONS} iterations on every rank ({text})" if ok
                        else f"expected completion: {outcomes}"])


SCENARIO = CollectiveScenario("000", loop, lambda mode, result: desync_outcome(result), judge)
