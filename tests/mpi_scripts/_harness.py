"""Rank-side harness for scripts launched by the ``run_mpi`` fixture.

``mpi_main(fn)`` runs ``fn(comm)`` and turns any exception on any rank into
``MPI.COMM_WORLD.Abort(1)``, so a failing rank never leaves its peers hung.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import Any


def mpi_main(fn: Callable[[Any], None]) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    try:
        fn(comm)
    except BaseException:  # any failure, KeyboardInterrupt included, must abort every rank
        sys.stdout.flush()
        print(f"[rank {comm.Get_rank()}] FAILED:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
    sys.stdout.flush()
