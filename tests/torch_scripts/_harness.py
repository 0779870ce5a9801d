"""Launcher- and rank-side harness for the torch.distributed (gloo, CPU) scripts, as
tests/mpi_scripts/_harness.py is for the MPI ones.

``torch_main(fn, world, *args)`` starts ``world`` ranks; each joins one gloo group through a
file rendezvous, runs ``fn(rank, world, *args)``, waits for its peers and tears the group
down. A rank that fails writes its report in one write and exits at once; the launcher then
terminates the other ranks (they may be blocked in a collective with it) and exits 1. A job
still running at its deadline is killed the same way, so a script run by hand cannot hang.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

# Every blocking gloo call of the default group gives up after this long.
PROCESS_GROUP_TIMEOUT = timedelta(seconds=60)
# Below the timeouts of the tests that spawn these scripts, so the launcher's own report
# (which ranks were still running) is what a hung job shows.
DEFAULT_DEADLINE_S = 150.0


def _write_report(text: str) -> None:
    sys.stdout.flush()
    os.write(2, text.encode())  # one write: the report arrives whole or not at all


def _rank_main(rank: int, fn: Callable[..., None], world: int, store_path: str,
               teardown: bool, args: tuple[Any, ...]) -> None:
    try:
        # A file rendezvous, not a TCP port picked in advance: a port chosen free can be
        # taken by another job before rank 0 binds it.
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                world_size=world, timeout=PROCESS_GROUP_TIMEOUT)
        fn(rank, world, *args)
        # Nobody leaves while a peer may still talk to it: a closed gloo pair fails the
        # peer's next operation.
        dist.barrier()
    except BaseException:  # any failure, KeyboardInterrupt included, must end the job
        _write_report(f"[rank {rank}] FAILED:\n{traceback.format_exc()}")
        # No teardown and no interpreter cleanup: peers may be blocked in a collective with
        # this rank, and the launcher terminates them as soon as this process is gone.
        os._exit(1)
    sys.stdout.flush()
    if not teardown:
        os._exit(0)
    dist.destroy_process_group()


def torch_main(fn: Callable[..., None], world: int, *args: Any, start_method: str = "spawn",
               deadline_s: float = DEFAULT_DEADLINE_S, teardown: bool = True) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; exit 1 if any rank fails or
    the job outlives ``deadline_s``. ``fn`` must be picklable (a module-level function) for
    the "spawn" start method. ``teardown=False`` ends each rank with ``os._exit(0)`` after
    the final barrier instead of destroying the group: for jobs that leave an operation
    pending on purpose (a timed-out collective), which a group teardown would wait on."""
    folder = tempfile.mkdtemp(prefix="kvhandoff-gloo-")
    store_path = os.path.join(folder, "rendezvous")  # must not exist before the ranks start
    try:
        context = mp.start_processes(_rank_main, args=(fn, world, store_path, teardown, args),
                                     nprocs=world, join=False, start_method=start_method)
        deadline = time.monotonic() + deadline_s
        try:
            while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    running = [rank for rank, process in enumerate(context.processes)
                               if process.is_alive()]
                    for process in context.processes:
                        process.kill()
                        process.join()
                    _write_report(f"[launcher] ranks {running} still running after "
                                  f"{deadline_s}s: killed the job\n")
                    sys.exit(1)
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as exc:
            # join has terminated the other ranks already
            _write_report(f"[launcher] {exc}; the other ranks were terminated\n")
            sys.exit(1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
