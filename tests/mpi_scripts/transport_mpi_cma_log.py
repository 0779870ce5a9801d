"""MPITransport logs why the one-copy path was not agreed, under mpiexec -n 2:
``transport_mpi_cma_log.py LOG_DIR``.

Each rank builds transports one after another and reads back its own log file after each:
with logging off nothing is written; with it on, a transport that could not agree the path
with its peer writes one ``transport.cma_unavailable`` line for that peer, with the reason
(``use_cma=False``, ``KVHANDOFF_MPI_CMA=0``, the path off on the peer's side only), and one
that agreed it writes none. The test validates every line against the schema.

Any failed check raises; ``mpi_main`` then aborts every rank.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from _harness import mpi_main
from kvhandoff.collectives import configure_logging
from kvhandoff.engine.transports import MPITransport


def main(comm) -> None:
    assert comm.Get_size() == 2, "run with 2 ranks"
    rank, peer = comm.Get_rank(), 1 - comm.Get_rank()
    log_dir = Path(sys.argv[1])
    log_file = log_dir / f"rank-{rank}.jsonl"
    seen = 0

    def new_lines() -> list[dict]:
        nonlocal seen
        lines = log_file.read_text().splitlines() if log_file.exists() else []
        fresh, seen = lines[seen:], len(lines)
        return [json.loads(line) for line in fresh]

    def expect_one(transport: MPITransport, reason_start: str) -> None:
        lines = new_lines()
        assert [(x["event"], x["rank"], x["peer"]) for x in lines] == [
            ("transport.cma_unavailable", rank, peer)], lines
        assert lines[0]["reason"].startswith(reason_start), lines
        assert transport.cma_peers == frozenset() and transport.cma_unavailable, transport
        transport.close()

    configure_logging(None)
    MPITransport(comm, use_cma=False).close()
    configure_logging(log_dir)
    assert new_lines() == [], "a transport logged with logging off"

    expect_one(MPITransport(comm, use_cma=False), "disabled")
    os.environ["KVHANDOFF_MPI_CMA"] = "0"
    try:
        expect_one(MPITransport(comm), "disabled")
    finally:
        del os.environ["KVHANDOFF_MPI_CMA"]
    # Off on rank 0's side only: rank 1 hears it is off on its peer's side.
    one_sided = MPITransport(comm, use_cma=rank == 1)
    if rank == 1:
        assert one_sided.cma_unavailable == "off on the side of ranks [0]", one_sided
    expect_one(one_sided, "disabled" if rank == 0 else "off on that rank's side")

    agreed = MPITransport(comm)
    lines = new_lines()
    if agreed.cma_unavailable is None:  # agreed: nothing to say
        assert lines == [], lines
    else:  # no ptrace permission here, say: the reason is logged all the same
        assert [(x["event"], x["peer"]) for x in lines] == [
            ("transport.cma_unavailable", peer)], lines
        assert lines[0]["reason"] in agreed.cma_unavailable, (lines, agreed.cma_unavailable)
    agreed.close()
    comm.Barrier()
    configure_logging(None)
    print(f"rank {rank} cma log OK", flush=True)


if __name__ == "__main__":
    mpi_main(main)
