"""Launcher for the NIXL two-process scripts: ranks are plain processes on 127.0.0.1 that
meet through a file rendezvous (``NixlTransport.rendezvous``), not MPI.

``launch(script, scenario, world)`` starts ``world`` copies of ``script`` (``python script
--rank r --world n --folder f scenario``), each in the launcher's process group. When a rank
exits non-zero, or the job outlives its deadline, the launcher kills every rank that is
still running and exits 1, after printing which ranks failed; a rank that dies by a signal
on purpose says so first (``expect_killed``). The test that runs the launcher kills the whole
group at its own timeout too, so nothing can hang.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

DEFAULT_DEADLINE_S = 90.0


def launch(script: str, scenario: str, world: int, deadline_s: float = DEFAULT_DEADLINE_S,
           expect_killed: frozenset[int] = frozenset()) -> int:
    """Run the ranks; 0 when every rank exited 0 (or was SIGKILLed, for ranks in
    ``expect_killed``)."""
    folder = tempfile.mkdtemp(prefix="kvhandoff-nixl-")
    procs = [subprocess.Popen([sys.executable, script, "--rank", str(rank), "--world",
                               str(world), "--folder", folder, scenario])
             for rank in range(world)]
    deadline = time.monotonic() + deadline_s
    failed: list[str] = []
    while any(p.poll() is None for p in procs):
        for rank, proc in enumerate(procs):
            code = proc.poll()
            if code not in (None, 0) and not (code == -signal.SIGKILL and rank in expect_killed):
                failed.append(f"rank {rank} exited {code}")
        if failed or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # the launcher polls child processes; there is nothing to wait on
    else:
        for rank, proc in enumerate(procs):
            code = proc.returncode
            if code != 0 and not (code == -signal.SIGKILL and rank in expect_killed):
                failed.append(f"rank {rank} exited {code}")
    running = [rank for rank, p in enumerate(procs) if p.poll() is None]
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if running and not failed:
        failed.append(f"ranks {running} still running after {deadline_s}s")
    if failed:
        print(f"[launcher] {'; '.join(failed)}: killed the job", flush=True)
        return 1
    print(f"[launcher] {scenario}: all ranks OK", flush=True)
    return 0


def rank_main(scenarios: dict[str, Callable[[int, int, str], None]]) -> None:
    """The entry point of a rank (or, with ``--launch``, of the launcher)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=sorted(scenarios))
    parser.add_argument("--rank", type=int, default=-1)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--folder", default="")
    parser.add_argument("--expect-killed", default="", help="comma-separated ranks")
    parser.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S)
    args = parser.parse_args()
    if args.rank < 0:
        killed = frozenset(int(r) for r in args.expect_killed.split(",") if r)
        sys.exit(launch(os.path.abspath(sys.argv[0]), args.scenario, args.world,
                        args.deadline_s, killed))
    try:
        scenarios[args.scenario](args.rank, args.world, args.folder)
    except BaseException:
        import traceback

        sys.stdout.flush()
        os.write(2, f"[rank {args.rank}] FAILED:\n{traceback.format_exc()}".encode())
        os._exit(1)
    print(f"[rank {args.rank}] {args.scenario} OK", flush=True)
    sys.stdout.flush()
    # No interpreter teardown: NIXL's agent destructors at exit add nothing a test checks.
    os._exit(0)
