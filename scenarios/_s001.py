"""Seed 001 (TensorRT-LLM PR 14020): entry into a status check that holds a TP allgather is
gated on a rank-local scheduler value (the free-block count, which drifted by one on half
the ranks); the other ranks go on to the next phase's allreduce. Unsafe: half the ranks sit
in one collective, half in another, and the job hangs (ended by the runner's watchdog).
Checked: a CollectiveDesyncError within the deadline, naming every rank's call. Fixed: the
gate is OR-reduced across ranks (``comm.any(flag)``); ranks that do not need the status
still join the allgather.
"""

from __future__ import annotations

from typing import Any

from kvhandoff.scenarios._collective_common import desync_lines, desync_outcome
from kvhandoff.scenarios._runner import CollectiveScenario, Hung, Outcome, Verdict

NEEDED_BLOCKS = 8
STEPS = 3


def free_blocks(rank: int, step: int, seed: int) -> int:
    """Rank-local: on the last step half the ranks' count drifted down by one."""
    drift = 1 if step == STEPS - 1 and (rank + seed) % 2 == 0 else 0
    return NEEDED_BLOCKS - drift


def loop(comm: Any, mode: str, seed: int) -> list[Any]:
    statuses = []
    for step in range(STEPS):
        needs_status = free_blocks(comm.rank, step, seed) < NEEDED_BLOCKS  # rank-local gate
        if mode == "fixed":
            if comm.any(needs_status):
                statuses.append(comm.allgather("status" if needs_status else None))
        elif needs_status:
            statuses.append(comm.allgather("status"))  # the status check's TP allgather
        comm.allreduce(1)  # the next phase's collective
    return statuses


def judge(mode: str, outcomes: dict[int, Outcome], hung: dict[int, Hung]) -> Verdict:
    size = 4
    if mode == "unsafe":
        if hung:  # the lines naming where each rank was are added by the runner
            return Verdict(True, ["hung: ranks split between two collectives"])
        return Verdict(False, [f"expected a hang, got: {outcomes}"])
    if hung:
        return Verdict(False, [f"unexpected hang of ranks {sorted(hung)}"])
    if mode == "checked":
        ok, lines = desync_lines(outcomes, size)
        return Verdict(ok, lines)
    ok = len(outcomes) == size and all(o["kind"] == "ok" for o in outcomes.values())
    return Verdict(ok, ["completed: every rank joined the status check the gate asked for"
                        if ok else f"expected completion: {outcomes}"])


SCENARIO = CollectiveScenario("001", loop, lambda mode, result: desync_outcome(result), judge)
