"""Property test: random programs on 2-8 in-process ranks with random rank-divergent branches.

Every divergence is caught at the first mismatched call, symmetric programs never raise, and
no rank ever runs past its deadline (simulate_ranks' join timeout turns a hang into a
failure)."""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvhandoff.collectives import (
    CheckedComm,
    CollectiveDesyncError,
    CollectiveTimeoutError,
    simulate_ranks,
)

OPS = ("allgather", "gather", "bcast", "allreduce", "barrier", "any", "all")
DEADLINE_S = 0.5  # of the divergent call only: every other call has a generous deadline


def issue(comm: CheckedComm, op: str, value: int, tag: str | None,
          timeout: float | None = None) -> Any:
    """One collective; the tag tells symmetric calls (None) from divergent ones."""
    if op == "allgather":
        return comm.allgather(value, tag=tag, timeout=timeout)
    if op == "gather":
        return comm.gather(value, root=0, tag=tag, timeout=timeout)
    if op == "bcast":
        return comm.bcast(value, root=0, tag=tag, timeout=timeout)
    if op == "allreduce":
        return comm.allreduce(value, "sum", tag=tag, timeout=timeout)
    if op == "barrier":
        return comm.barrier(tag=tag, timeout=timeout)
    if op == "any":
        return comm.any(value % 2 == 0, tag=tag, timeout=timeout)
    return comm.all(value % 2 == 0, tag=tag, timeout=timeout)


def divergent_extra(comm: CheckedComm, op: str, value: int) -> Any:
    """A collective issued only by some ranks."""
    return issue(comm, op, value, "divergent-extra", DEADLINE_S)


@attrs.frozen
class Step:
    op: str
    subset: frozenset[int] | None = None  # ranks that take the divergent branch
    other_op: str | None = None  # None: the branch adds an extra call; else: replaces


@st.composite
def programs(draw: st.DrawFn) -> tuple[int, list[Step]]:
    n = draw(st.integers(2, 8))
    steps = draw(st.lists(st.builds(Step, st.sampled_from(OPS)), min_size=0, max_size=6))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(steps)))
        members = draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n - 1))
        replace = draw(st.booleans())
        op = draw(st.sampled_from(OPS))
        other = draw(st.sampled_from(OPS)) if replace else None
        steps.insert(at, Step(op, frozenset(members), other))
    return n, steps


def run_program(comm: CheckedComm, steps: list[Step]) -> list[Any]:
    out = []
    for step in steps:
        if step.subset is None:
            out.append(issue(comm, step.op, comm.rank, None))
        elif comm.rank in step.subset:
            out.append(divergent_extra(comm, step.op, comm.rank))
        elif step.other_op is not None:
            out.append(issue(comm, step.other_op, comm.rank, None))
    return out


def expected_symmetric(n: int, rank: int, op: str) -> Any:
    return {
        "allgather": list(range(n)), "gather": list(range(n)) if rank == 0 else None,
        "bcast": 0, "allreduce": sum(range(n)), "barrier": None, "any": True,
        "all": n == 1,
    }[op]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_random_programs_catch_every_divergence_at_the_first_mismatched_call(
        program: tuple[int, list[Step]]) -> None:
    n, steps = program
    results = simulate_ranks(n, lambda c: run_program(c, steps), timeout=20,
                             join_timeout=60, return_exceptions=True)
    divergent = [i for i, s in enumerate(steps) if s.subset is not None]
    if not divergent:
        for rank, got in enumerate(results):
            assert got == [expected_symmetric(n, rank, s.op) for s in steps]
        return
    index = divergent[0]
    step = steps[index]
    assert step.subset is not None
    first_mismatch = index  # every earlier step is symmetric: seq == step index
    calls_after = len(steps) - index - 1
    if step.other_op is None and calls_after == 0:
        # The branch ranks issue one last collective nobody else joins.
        for rank, got in enumerate(results):
            if rank in step.subset:
                assert isinstance(got, CollectiveTimeoutError), (rank, got)
                assert got.seq == first_mismatch
                assert got.missing == sorted(set(range(n)) - step.subset)
            else:
                assert isinstance(got, list) and len(got) == index
        return
    # Otherwise every rank meets a different collective at the same position.
    for rank, got in enumerate(results):
        assert isinstance(got, CollectiveDesyncError), (rank, got)
        assert got.seq == first_mismatch
        assert sorted(got.table) == list(range(n))
        for peer, fingerprint in got.table.items():
            if peer in step.subset:
                assert (fingerprint.op, fingerprint.tag) == (step.op, "divergent-extra")
            else:
                their_op = step.other_op if step.other_op is not None else steps[index + 1].op
                assert (fingerprint.op, fingerprint.tag) == (their_op, None)
