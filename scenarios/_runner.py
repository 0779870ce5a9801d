"""What every scenario shares: the unchecked collectives of the unsafe runs, the watchdog that
ends a hang, running four ranks embedded or as this process's rank under MPI, the verdict.

Unsafe runs use ``TracedComm``: plain collectives (mpi4py on COMM_WORLD, or an in-process
exchange with MPI's matching rules: calls of one kind match in the order they are issued,
calls of different kinds never match) that check nothing. They only write the schema's
per-call lines (``collective.enter`` / ``collective.exit``) when a log directory is set, so
that ``kvhandoff analyze`` can place every rank afterwards, as it does for checked runs.
"""

from __future__ import annotations

import faulthandler
import functools
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvhandoff.collectives import rank_logger

WORLD = 4
# name -> (field failure, module)
SCENARIOS: dict[str, tuple[str, str]] = {
    "000": ("TensorRT-LLM PR 14560: allgather inside a rank-divergent gate",
            "kvhandoff.scenarios._s000"),
    "001": ("TensorRT-LLM PR 14020: rank-local gate into a status-check collective",
            "kvhandoff.scenarios._s001"),
    "002": ("TensorRT-LLM PR 13796: blocking status poll and a free while in flight",
            "kvhandoff.scenarios._s002"),
    "003": ("FastDeploy PR 8034: layer signals batched by rank-local timing",
            "kvhandoff.scenarios._s003"),
}


@dataclass
class Verdict:
    """What one run showed: ``ok`` when it showed what it should (unsafe: the symptom;
    safe: protection and completion); ``lines`` the short report printed."""

    ok: bool
    lines: list[str] = field(default_factory=list)


@dataclass
class Hung:
    """A rank the watchdog found still inside a call after the bound."""

    position: str
    stack: str


def _site(skip: int) -> str:
    frame = sys._getframe(skip)
    return f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}"


class _RawHub:
    """In-process exchange without checks: calls of one op match in issue order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._cond = threading.Condition()
        self._slots: dict[tuple[str, int], dict[int, Any]] = {}

    def exchange(self, op: str, index: int, rank: int, value: Any) -> list[Any]:
        key = (op, index)
        with self._cond:
            slot = self._slots.setdefault(key, {})
            slot[rank] = value
            self._cond.notify_all()
            while len(slot) < self.size:
                self._cond.wait()
            return [slot[r] for r in range(self.size)]


class TracedComm:
    """Unchecked collectives (see the module docstring); ``position`` is the last call."""

    def __init__(self, name: str, rank: int, size: int,
                 exchange: Callable[[str, Any], list[Any] | Any], log_rank: int) -> None:
        self.name, self.rank, self.size = name, rank, size
        self._exchange = exchange
        self._seq = 0
        self._log = rank_logger(log_rank)
        self.position = "before its first call"

    def _call(self, op: str, value: Any, reduce_op: str | None) -> Any:
        site, seq = _site(3), self._seq
        self._seq += 1
        self.position = f"{op} seq {seq} at {site}"
        self._log.debug("collective.enter", comm=self.name, seq=seq, op=op, site=site,
                        tag=None, root=None, reduce_op=reduce_op, summary=type(value).__name__)
        start = time.time()
        result = self._exchange(op, value)
        self._log.debug("collective.exit", comm=self.name, seq=seq, op=op, site=site, tag=None,
                        duration_s=time.time() - start, state="completed")
        self.position = f"after {op} seq {seq} at {site}"
        return result

    def allgather(self, obj: Any) -> list[Any]:
        return list(self._call("allgather", obj, None))

    def allreduce(self, value: Any) -> Any:
        return self._call("allreduce", value, "sum")

    def barrier(self) -> None:
        self._call("barrier", None, None)


def raw_local_group(n: int, name: str) -> list[TracedComm]:
    hub = _RawHub(n)
    comms = []
    for rank in range(n):
        counts: dict[str, int] = {}

        def exchange(op: str, value: Any, rank: int = rank,
                     counts: dict[str, int] = counts) -> Any:
            index = counts.get(op, 0)
            counts[op] = index + 1
            values = hub.exchange(op, index, rank, value)
            return sum(values) if op == "allreduce" else values

        comms.append(TracedComm(name, rank, n, exchange, rank))
    return comms


def _wait_polling(request: Any) -> None:
    # Poll instead of a blocking MPI call: a blocked rank must still let its watchdog thread
    # run (some of MPICH's blocking calls hold the GIL for as long as they block).
    while not request.Test():
        time.sleep(0.001)


def raw_mpi_comm(world: Any, name: str) -> TracedComm:
    import numpy as np

    comm = world.Dup()

    def exchange(op: str, value: Any) -> Any:
        if op == "allgather":
            return comm.allgather(value)
        if op == "allreduce":  # the scenarios reduce ints
            send = np.array([int(value)], dtype=np.int64)
            total = np.zeros(1, dtype=np.int64)
            _wait_polling(comm.Iallreduce(send, total))
            return int(total[0])
        _wait_polling(comm.Ibarrier())
        return None

    return TracedComm(name, comm.Get_rank(), comm.Get_size(), exchange, world.Get_rank())


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:160]


def run_threads(fns: Sequence[Callable[[], Any]], bound: float,
                where: Callable[[int], str]) -> tuple[dict[int, Any], dict[int, Hung]]:
    """Run one function per rank on its own thread; after ``bound`` seconds the ranks still
    running are reported hung (their position and stack). Results hold return values or the
    exception a rank raised. Hung threads are daemons, left behind blocked."""
    results: dict[int, Any] = {}

    def run(rank: int) -> None:
        try:
            results[rank] = fns[rank]()
        except Exception as exc:  # reported per rank in the verdict
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(r,), name=f"scenario-rank-{r}", daemon=True)
               for r in range(len(fns))]
    for thread in threads:
        thread.start()
    end = time.monotonic() + bound
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    frames = sys._current_frames()
    hung = {}
    for rank, thread in enumerate(threads):
        if thread.is_alive() and thread.ident is not None:
            frame = frames.get(thread.ident)
            stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
            hung[rank] = Hung(where(rank), stack)
    return results, hung


def hung_lines(hung: dict[int, Hung], bound: float, show_stacks: bool) -> list[str]:
    lines = [f"hung: ranks {sorted(hung)} still blocked after the {bound:g} s bound"]
    for rank, found in sorted(hung.items()):
        lines.append(f"  rank {rank}: {found.position}")
        if show_stacks:
            lines.extend("    " + text for text in found.stack.rstrip().splitlines()[-4:])
    return lines


def mpi_watchdog(bound: float, where: Callable[[], str], rank: int, exit_code: int,
                 header: str | None, show_stacks: bool) -> threading.Timer:
    """Under MPI, end this rank if it is still blocked after ``bound`` seconds: print where it
    was (and, with ``show_stacks``, every thread's stack from faulthandler), then leave the
    process (peers do the same)."""

    def fire() -> None:
        # The ranks speak in rank order (a short stagger keeps their lines apart), and all
        # leave together afterwards: the first rank to leave ends the whole job.
        time.sleep(0.15 * rank)
        if header is not None:
            print(header, flush=True)
        print(f"  rank {rank}: hung in {where()}", flush=True)
        if show_stacks:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
        time.sleep(max(0.0, 0.15 * WORLD + 0.3 - 0.15 * rank))
        os._exit(exit_code)

    timer = threading.Timer(bound, fire)
    timer.daemon = True
    timer.start()
    return timer


# One rank's outcome, small and picklable (it crosses ranks under MPI): "kind" (the
# exception's type name, or "ok"), "text" and whatever the scenario adds.
Outcome = dict[str, Any]


@dataclass
class CollectiveScenario:
    """A collective scenario: ``body(comm, mode, seed)`` is one rank's loop; ``outcome``
    reduces its result (or exception) to an Outcome; ``judge`` makes the verdict from every
    rank's outcome and the hung ranks."""

    name: str
    body: Callable[[Any, str, int], Any]
    outcome: Callable[[str, Any], Outcome]
    judge: Callable[[str, dict[int, Outcome], dict[int, Hung]], Verdict]
    bound_s: float = 3.0
    deadline_s: float = 2.0


def run_collective(scenario: CollectiveScenario, mode: str, seed: int, backend: str,
                   show_stacks: bool) -> Verdict | None:
    """Run ``scenario`` in ``mode`` ("unsafe", "checked" or "fixed"); the verdict (None on
    the MPI ranks other than 0)."""
    if backend == "mpi":
        return _run_collective_mpi(scenario, mode, seed, show_stacks)
    from kvhandoff.collectives import local_group

    name = f"scenario-{scenario.name}-{mode}"
    comms: list[Any]
    if mode == "unsafe":
        comms = raw_local_group(WORLD, name)
        bound = scenario.bound_s
        where = lambda r: comms[r].position  # noqa: E731
    else:
        comms = local_group(WORLD, name=name, timeout=scenario.deadline_s)
        bound = 4 * scenario.deadline_s
        where = lambda r: str(comms[r].position())  # noqa: E731
    fns = [functools.partial(scenario.body, comm, mode, seed) for comm in comms]
    results, hung = run_threads(fns, bound, where)
    if mode != "unsafe":
        for rank, comm in enumerate(comms):
            if rank not in hung:
                comm.close()
    outcomes = {r: scenario.outcome(mode, results[r]) for r in results if r not in hung}
    verdict = scenario.judge(mode, outcomes, hung)
    if hung:
        verdict.lines.extend(hung_lines(hung, bound, show_stacks)[1:])
    return verdict


def _run_collective_mpi(scenario: CollectiveScenario, mode: str, seed: int,
                        show_stacks: bool) -> Verdict | None:
    from kvhandoff.collectives import CheckedComm
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    name = f"scenario-{scenario.name}-{mode}"
    comm: Any
    if mode == "unsafe":
        comm = raw_mpi_comm(world, name)
        bound = scenario.bound_s
        where = lambda: comm.position  # noqa: E731
    else:
        comm = CheckedComm.from_mpi(world, name=name, timeout=scenario.deadline_s)
        bound = 4 * scenario.deadline_s
        where = lambda: str(comm.position())  # noqa: E731
    # A hang is the unsafe run's expected symptom: each rank says where it is and leaves.
    expected = mode == "unsafe" and scenario.judge(mode, {}, {0: Hung("", "")}).ok
    header = (f"hung: every rank still blocked after the {bound:g} s bound (watchdog)"
              if rank == 0 else None)
    world.Barrier()
    timer = mpi_watchdog(bound, where, rank, 0 if expected else 1, header, show_stacks)
    try:
        result: Any = scenario.body(comm, mode, seed)
    except Exception as exc:  # reported in the verdict
        result = exc
    # Still watched: a rank that got through (MPI matched its calls differently) waits here.
    gathered = world.gather(scenario.outcome(mode, result), root=0)
    timer.cancel()
    if gathered is None:
        return None
    return scenario.judge(mode, dict(enumerate(gathered)), {})


def exc_outcome(result: Any) -> Outcome:
    if isinstance(result, BaseException):
        return {"kind": type(result).__name__, "text": describe(result)}
    return {"kind": "ok", "text": repr(result)[:120]}


def short_site(site: str) -> str:
    """``path/to/_s000.py:41 loop`` -> ``_s000.py:41 loop``."""
    path, _, rest = site.partition(":")
    return f"{os.path.basename(path)}:{rest}"
