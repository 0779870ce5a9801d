"""Rank-side harness for scripts launched by the ``run_mpi`` fixture.

``mpi_main(fn)`` runs ``fn(comm)`` and turns any exception on any rank into
``MPI.COMM_WORLD.Abort(1)``, so a failing rank never leaves its peers hung.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

# How long a failing rank waits between writing its report and aborting the job: Abort tears
# every process down at once, and the launcher may not have forwarded the report yet.
_FORWARD_GRACE_S = 0.5


def mpi_main(fn: Callable[[Any], None]) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    try:
        fn(comm)
    except BaseException:  # any failure, KeyboardInterrupt included, must abort every rank
        report = f"[rank {comm.Get_rank()}] FAILED:\n{traceback.format_exc()}"
        sys.stdout.flush()
        os.write(2, report.encode())  # one write: the report arrives whole or not at all
        time.sleep(_FORWARD_GRACE_S)
        comm.Abort(1)
    sys.stdout.flush()
