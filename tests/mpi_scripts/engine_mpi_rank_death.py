"""A rank dies in the middle of transfers: ``mpiexec -n 2 [-disable-auto-cleanup]
engine_mpi_rank_death.py``.

Rank 0 sends "big" to rank 1 (4 MiB: large enough that MPI moves it by rendezvous, so the
send can only finish with rank 1's help) and waits to receive "small" from it. Rank 1
advertises its receive of "big" and dies right after (``os._exit``, no MPI_Finalize, no
abort), the way a process killed by the OOM killer would. By default the launcher (MPICH's
hydra) then kills the whole job, survivors included. With ``-disable-auto-cleanup`` rank 0
lives on, and must: fail both transfers (its send of "big", its receive of "small") with
``peer_lost`` or ``transport_error`` once rank 1's lease lapses; say the send's outcome is
unknown (its bytes may have landed); keep the blocks of the send pinned, since MPI cannot
cancel a posted send and the pending operation may still read them; release the receive's
blocks (a receive can be cancelled); and drain with a report naming what is left. Rank 0
then prints ``rank 0 survivor OK ...`` and leaves with ``os._exit`` (MPI_Finalize would
wait for the send that never ends).
"""

from __future__ import annotations

import os
import sys
import time

import anyio
import torch
from _harness import mpi_main
from kvhandoff.engine import BlockPool, EngineConfig, TransferEngine, TransferError
from kvhandoff.engine.transports import MPITransport
from mpi4py import MPI

LEASE_S = 2.0
SAW_ADVERTISE = 77  # rank 0 -> rank 1 on the world communicator: "your advertise is here"
BIG_BLOCKS = 64  # 64 blocks x 64 KiB: 4 MiB, far above any eager threshold


async def survivor(comm) -> None:
    transport = MPITransport(comm)
    pool = BlockPool(2 * BIG_BLOCKS, 4, 16, 8, 32, dtype=torch.float32, debug=True)
    config = EngineConfig(queue_timeout_s=30.0, transfer_timeout_s=30.0, lease_s=LEASE_S,
                          drain_timeout_s=2.0)
    big, small = pool.alloc(BIG_BLOCKS, owner="big"), pool.alloc(1, owner="small")
    async with TransferEngine(pool, transport, config=config) as engine:
        sent = engine.send("big", big, 1)
        got = engine.receive("small", small, 1)
        with anyio.fail_after(10 * LEASE_S):  # rank 1's advertise arrived: the send is posted
            while engine.session("big").state.name != "IN_FLIGHT":
                await anyio.sleep(0.001)  # yield to the engine's loop; the predicate decides
        comm.Isend([bytearray(1), MPI.BYTE], dest=1, tag=SAW_ADVERTISE)  # rank 1 may die now
        pool.free(big, owner="big")
        pool.free(small, owner="small")
        start = time.monotonic()
        reasons = {}
        with anyio.fail_after(10 * LEASE_S):
            for name, handle in (("big", sent), ("small", got)):
                try:
                    await handle.wait()
                except TransferError as exc:
                    reasons[name] = (str(exc.reason), exc.outcome_unknown)
                else:
                    raise AssertionError(f"{name} completed although rank 1 died")
        waited = time.monotonic() - start
        assert reasons["big"][0] in ("peer_lost", "transport_error"), reasons
        assert reasons["small"][0] in ("peer_lost", "transport_error"), reasons
        assert reasons["big"] == ("peer_lost", True) or reasons["big"][0] == "transport_error"
        report = await engine.drain(2.0)  # waits for what can settle, then reports the rest
        left = {s.request_id: s.state.name for s in report.left}
        if "big" in left:  # the MPI send never ends: its blocks stay pinned, never freed
            assert pool.pinned_by("big"), "a pending send's blocks were released"
            assert left["big"] == "QUARANTINED", left
        assert "small" not in left, left  # the receive was cancelled and released
        assert not pool.pinned_by("small")
    print(f"rank 0 survivor OK: big={reasons['big'][0]} (outcome unknown: "
          f"{reasons['big'][1]}), small={reasons['small'][0]}, failed after {waited:.1f}s "
          f"(lease {LEASE_S}s), drain left {sorted(left.items())}, "
          f"pinned {pool.num_pinned} blocks", flush=True)


async def dying(comm) -> None:
    transport = MPITransport(comm)
    pool = BlockPool(2 * BIG_BLOCKS, 4, 16, 8, 32, dtype=torch.float32)
    dst = pool.alloc(BIG_BLOCKS, owner="big")
    engine = TransferEngine(pool, transport, config=EngineConfig(lease_s=LEASE_S))
    async with engine:
        engine.receive("big", dst, 0)  # posts the receive and sends the advertise
        # Die once rank 0 has the advertise, and before this engine moves any data: the
        # wait blocks this loop on purpose (a dying process makes no progress), polling
        # rank 0's word with a deadline.
        seen = comm.Irecv([bytearray(1), MPI.BYTE], source=0, tag=SAW_ADVERTISE)
        deadline = time.monotonic() + 30.0
        while not seen.Test():
            if time.monotonic() > deadline:
                raise TimeoutError("rank 0 never saw the advertise")
            time.sleep(1e-3)  # back off between polls of the condition
        print("rank 1 dies now", flush=True)
        os._exit(3)


def main(comm) -> None:
    if comm.Get_size() != 2:
        raise SystemExit("run with mpiexec -n 2")
    if comm.Get_rank() == 0:
        anyio.run(survivor, comm)
        print("rank 0 leaving", flush=True)
        sys.stdout.flush()
        os._exit(0)  # MPI_Finalize would wait for the send that never ends
    anyio.run(dying, comm)


if __name__ == "__main__":
    mpi_main(main)
