"""The collectives seed scenarios on a real backend, run by every rank of a job.

``python coll_scenarios.py [LOG_DIR]`` under ``mpiexec -n 4``; the torch.distributed
variant (tests/torch_scripts/coll_torch_scenarios.py) imports ``run_scenarios`` with its own
comm factory. Each scenario asserts this rank's
outcome and prints ``scenario NAME rank R ok``; any failed assertion aborts the job.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from kvhandoff.collectives import (
    CheckedComm,
    CollectiveAbortedError,
    CollectiveDesyncError,
    CollectiveTimeoutError,
    CommClosedError,
    PayloadError,
    SymmetricOutbox,
    configure_logging,
)

Factory = Callable[[str, float], CheckedComm]


def expect(error_type: type[BaseException], fn: Callable[[], Any]) -> Any:
    try:
        fn()
    except error_type as exc:
        return exc
    raise AssertionError(f"expected {error_type.__name__}")


def seed000(comm: CheckedComm, fixed: bool) -> Any:
    outbox = SymmetricOutbox(comm)
    if comm.rank % 2 == 0:  # rank-divergent gate
        if fixed:
            outbox.put(True)
        else:
            comm.allgather(True)
    if fixed:
        outbox.flush()
    return comm.gather({"rank": comm.rank, "batch": 4}, root=0)


def seed001(comm: CheckedComm, variant: str) -> Any:
    wants = comm.rank < comm.size // 2
    if variant == "fixed":
        if comm.any(wants):
            return comm.allgather("status" if wants else None)
        return None
    if wants:
        return comm.allgather("status")
    if variant == "mixed":
        return comm.allreduce(1, "sum")
    return None  # "missing": these ranks never join


def seed003(comm: CheckedComm, batched: bool) -> int:
    layers = [0, 1]
    batches = [layers] if (batched and comm.rank == 0) else [[x] for x in layers]
    for _batch in batches:
        comm.barrier(tag="layer-sent")
    return int(comm.allreduce(len(layers), "sum", tag="layers-done"))


def run_scenarios(make: Factory, rank: int, size: int) -> None:
    def ok(name: str) -> None:
        print(f"scenario {name} rank {rank} ok", flush=True)

    comm = make("seed000", 10.0)
    err = expect(CollectiveDesyncError, lambda: seed000(comm, fixed=False))
    assert err.seq == 0 and {f.op for f in err.table.values()} == {"allgather", "gather"}
    assert len({f.site for f in err.table.values()}) == 2
    ok("seed000")

    comm = make("seed000-fixed", 10.0)
    got = seed000(comm, fixed=True)
    assert got == ([{"rank": r, "batch": 4} for r in range(size)] if rank == 0 else None)
    ok("seed000-fixed")

    comm = make("seed001-mixed", 10.0)
    err = expect(CollectiveDesyncError, lambda: seed001(comm, "mixed"))
    assert sorted(err.table) == list(range(size))
    ok("seed001-mixed")

    comm = make("seed001-fixed", 10.0)
    assert seed001(comm, "fixed") == ["status"] * (size // 2) + [None] * (size - size // 2)
    ok("seed001-fixed")

    comm = make("seed003", 10.0)
    if rank < 2:
        err = expect(CollectiveDesyncError, lambda: seed003(comm, batched=True))
        assert err.seq == 1
    else:
        comm.barrier(tag="layer-sent")  # ranks 2.. only take part in the first matched pair
        expect(CollectiveDesyncError, lambda: comm.barrier(tag="layer-sent"))
    ok("seed003")

    comm = make("seed003-fixed", 10.0)
    assert seed003(comm, batched=False) == 2 * size
    ok("seed003-fixed")

    comm = make("bcast-idiom", 10.0)
    payload = {"config": "x" * 2000}  # larger than a slot: exercises the second phase
    if rank == 0:
        got = comm.bcast(payload, root=0, tag="cfg")
    else:
        got = comm.bcast(None, root=0, tag="cfg")
    assert got == payload
    # One call, payloads in and out of the slot: the fast agreement must not take a stale
    # slot for a payload, and every rank gets every payload.
    for big in (0, 1, size):  # rank 0 oversized, rank 1 oversized, every rank oversized
        mine = "y" * 1000 if rank == big or big == size else rank
        assert comm.allgather(mine, tag="mixed") == [
            "y" * 1000 if r == big or big == size else r for r in range(size)]
    ok("bcast-idiom")

    comm = make("buffers", 10.0)
    stacked = comm.allgather_buffer(np.arange(3) + rank)
    assert stacked.tolist() == [[r, r + 1, r + 2] for r in range(size)]
    assert comm.allreduce_buffer(np.full(2, rank), "max").tolist() == [size - 1] * 2
    strided = (np.arange(6) + rank).reshape(2, 3).T  # not C-contiguous
    assert comm.allgather_buffer(strided).tolist() == [
        (np.arange(6) + r).reshape(2, 3).T.tolist() for r in range(size)]
    err = expect(CollectiveDesyncError, lambda: comm.allgather_buffer(np.zeros(2 + rank % 2)))
    unchecked = make("buffers-off", 10.0)
    unchecked.buffer_check = "off"  # no preflight exchange: recorded and bounded only
    assert unchecked.allreduce_buffer(np.full(3, rank), "sum").tolist() == [sum(range(size))] * 3
    if unchecked._backend.inline_buffer_bytes >= 24:
        # Where small numpy buffers ride with their fingerprint (MPI), they are checked even
        # with the preflight off: a mismatch is a desync, not the backend's undefined behaviour.
        expect(CollectiveDesyncError, lambda: unchecked.allgather_buffer(np.zeros(2 + rank % 2)))
    ok("buffers")

    comm = make("unpicklable", 30.0)
    if rank == 1:
        expect(PayloadError, lambda: comm.allgather(threading.Lock()))
    else:
        err = expect(CollectiveAbortedError, lambda: comm.allgather("x" * 2000))
        assert list(err.reasons) == [1]
    ok("unpicklable")

    comm = make("closed", 30.0)
    if rank == 0:
        comm.close()
        expect(CommClosedError, lambda: comm.allgather(1))
    else:
        err = expect(CollectiveAbortedError, lambda: comm.allgather(1))
        assert err.reasons == {0: "closed the communicator"}
    ok("closed")

    # Issue 13 item 3: rank 1 skips a collective; then every rank posts two non-blocking
    # calls and waits on the second. Rank 1 must see the desync of seq 0 (its earlier,
    # unwaited call), not wait out the deadline of the second.
    comm = make("diverge-pending", 20.0)
    if rank != 1:
        err = expect(CollectiveDesyncError, lambda: comm.allreduce(1))
    else:
        first = comm.ibarrier()
        second = comm.iallgather(rank)
        err = expect(CollectiveDesyncError, second.result)
        assert expect(CollectiveDesyncError, first.result) is err
    assert err.seq == 0 and err.mismatched_ranks == [1], (err.seq, err.mismatched_ranks)
    assert {f.op for f in err.table.values()} == {"allreduce", "barrier"}
    assert all(f.site in str(err) for f in err.table.values())
    ok("diverge-pending")

    # A rank that gave up on a call (its deadline passed while a peer was late) tells its
    # peers at its next position: they complete that call with its contribution and then
    # get CollectiveAbortedError naming it at once, not a timeout at their own deadline.
    side = make("timeout-notice-side", 20.0)
    comm = make("timeout-notice", 20.0)
    if rank == 0:
        expect(CollectiveTimeoutError, lambda: comm.allgather(rank, tag="a", timeout=0.5))
        side.barrier(tag="given-up")  # the others start only once this rank has given up
    else:
        side.barrier(tag="given-up")
        assert comm.allgather(rank, tag="a") == list(range(size))
        err = expect(CollectiveAbortedError, lambda: comm.allgather(rank, tag="b"))
        assert list(err.reasons) == [0] and "timed out" in err.reasons[0], err.reasons
    ok("timeout-notice")

    # Last: after a timeout the wire of this communicator is out of step for good.
    comm = make("seed001-missing", 2.0)
    comm.barrier(tag="start")
    if rank < size // 2:
        started = time.monotonic()
        err = expect(CollectiveTimeoutError, lambda: seed001(comm, "missing"))
        assert time.monotonic() - started < 30
        assert err.arrived == list(range(size // 2)), err.arrived
        assert err.missing == list(range(size // 2, size)), err.missing
        assert err.positions[rank] is not None and err.positions[rank].state == "timeout"
    else:
        assert seed001(comm, "missing") is None
        time.sleep(3.0)  # busy elsewhere (and alive) while the others wait for them
    ok("seed001-missing")


def main_mpi(world: Any) -> None:
    if len(sys.argv) > 1:
        configure_logging(sys.argv[1])

    def make(name: str, timeout: float) -> CheckedComm:
        return CheckedComm.from_mpi(world, name=name, timeout=timeout)

    run_scenarios(make, world.Get_rank(), world.Get_size())
    world.Barrier()


if __name__ == "__main__":
    from _harness import mpi_main

    mpi_main(main_mpi)
