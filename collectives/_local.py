"""The in-process backend: several ranks of one group inside one process.

Ranks meet in numbered slots of a shared hub: the k-th call of every rank lands in slot k,
exactly as the k-th collectives of MPI ranks match each other. A slot is complete when every
rank has contributed or closed. The hub knows each slot's arrivals and every rank's flight
recorder, so a timeout reports exact positions. Ranks may run as threads (``simulate_ranks``)
or as tasks of one event loop polling non-blocking handles (``local_group``); a blocking call
that can never complete (e.g. several ranks driven from one thread) ends at its deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ._backend import CLOSED, NORMAL, Contribution
from ._comm import DEFAULT_TIMEOUT_S, CheckedComm
from ._record import FlightRecorder, Position
from .errors import CollectiveArgumentError, SimulationError


class _Slot:
    __slots__ = ("contributions", "count", "reads", "result")

    def __init__(self, size: int) -> None:
        self.contributions: list[Contribution | None] = [None] * size
        self.count = 0
        self.reads = 0
        # Set once, under the hub lock; read without it (a single attribute load).
        self.result: list[Contribution] | None = None


class _Hub:
    """Shared state of one in-process group."""

    def __init__(self, size: int) -> None:
        self.size = size
        # The hot path takes ``lock`` directly (a C-level context manager); waiters use
        # ``cond``, which is built on the same lock.
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.slots: dict[int, _Slot] = {}
        self.closed: set[int] = set()
        self.recorders: dict[int, FlightRecorder] = {}

    def post(self, rank: int, seq: int, contribution: Contribution) -> _Slot:
        with self.lock:
            slot = self.slots.get(seq)
            if slot is None:
                slot = self.slots[seq] = _Slot(self.size)
            slot.contributions[rank] = contribution
            slot.count += 1
            if slot.count == self.size or self.closed:
                self._maybe_complete(slot)
            return slot

    def _maybe_complete(self, slot: _Slot) -> None:
        if slot.result is not None or slot.count + len(
                [r for r in self.closed if slot.contributions[r] is None]) < self.size:
            return
        slot.result = [c if c is not None else (CLOSED, None, None)
                       for c in slot.contributions]
        self.cond.notify_all()

    def read(self, seq: int, slot: _Slot) -> list[Contribution]:
        result = slot.result
        assert result is not None
        with self.lock:
            slot.reads += 1
            if slot.reads >= slot.count:
                self.slots.pop(seq, None)
        return result

    def close(self, rank: int) -> None:
        with self.cond:
            self.closed.add(rank)
            for slot in self.slots.values():
                self._maybe_complete(slot)
            self.cond.notify_all()

    def arrived(self, seq: int) -> set[int]:
        with self.cond:
            slot = self.slots.get(seq)
            if slot is None:
                return set()
            return {r for r, c in enumerate(slot.contributions) if c is not None}


class _LocalExchange:
    __slots__ = ("_header", "_hub", "_result", "_seq", "_slot")

    def __init__(self, hub: _Hub, seq: int, slot: _Slot, header: Any) -> None:
        self._hub = hub
        self._seq = seq
        self._slot = slot
        self._header = header
        self._result: list[Contribution] | None = None

    def test(self) -> bool:
        return self._slot.result is not None

    def agreed(self) -> list[Any] | None:
        """Every rank's payload when every rank contributed our very fingerprint, else None."""
        result = self.contributions()
        header = self._header
        for kind, peer_header, _payload in result:
            if kind != NORMAL or (peer_header is not header and peer_header != header):
                return None
        return [payload for _kind, _header, payload in result]

    def contributions(self) -> list[Contribution]:
        if self._result is None:
            self._result = self._hub.read(self._seq, self._slot)
        return self._result


class LocalBackend:
    """One rank's view of a hub."""

    piggyback_buffers = True
    inline_buffer_bytes = 0

    def __init__(self, hub: _Hub, rank: int, log_rank: int) -> None:
        self._hub = hub
        self.rank = rank
        self.size = hub.size
        self.log_rank = log_rank

    def attach(self, recorder: FlightRecorder) -> None:
        self._hub.recorders[self.rank] = recorder

    def post(self, seq: int, kind: int, header: tuple[Any, ...], payload: Any,
             same_len: bool = False) -> _LocalExchange:
        return _LocalExchange(self._hub, seq,
                              self._hub.post(self.rank, seq, (kind, header, payload)), header)

    # CheckedComm never calls these two: with piggyback_buffers the buffers travel as the
    # payload of post(), checked like any object.
    def post_buffer_allgather(self, buffer: Any) -> Any:
        raise AssertionError("the in-process backend piggybacks buffers on post()")

    def post_buffer_allreduce(self, buffer: Any, reduce_op: str) -> Any:
        raise AssertionError("the in-process backend piggybacks buffers on post()")

    def block(self, exchange: Any, max_s: float) -> None:
        hub = self._hub
        with hub.cond:
            if exchange is None or not exchange.test():
                hub.cond.wait(max_s)

    def announce(self, position: Position) -> None:
        """Nothing to do: peers read this rank's flight recorder directly."""

    def positions(self) -> dict[int, Position | None]:
        recorders = self._hub.recorders
        return {r: (recorders[r].last_position() if r in recorders else None)
                for r in range(self.size)}

    def arrived(self, seq: int, positions: dict[int, Position | None]) -> set[int]:
        return self._hub.arrived(seq)

    def close(self, seq: int) -> None:
        self._hub.close(self.rank)


def local_group(n: int, name: str = "local", *, timeout: float = DEFAULT_TIMEOUT_S,
                first_log_rank: int = 0, **kwargs: Any) -> list[CheckedComm]:
    """``n`` CheckedComms of one in-process group (index = rank), for ranks that run as tasks
    of one event loop using the non-blocking forms, or as threads. Rank r logs to
    ``rank-<first_log_rank + r>.jsonl`` (several groups in one process: give each its world
    offset). Keyword arguments go to CheckedComm (``buffer_check``, ``recorder_capacity``,
    ``watchdog``)."""
    if not isinstance(n, int) or n < 1:
        raise CollectiveArgumentError(f"group size must be a positive int, got {n!r}")
    hub = _Hub(n)
    comms = []
    for rank in range(n):
        backend = LocalBackend(hub, rank, first_log_rank + rank)
        comm = CheckedComm(backend, name=name, timeout=timeout, **kwargs)
        backend.attach(comm.recorder)
        comms.append(comm)
    return comms


def simulate_ranks(n: int, fn: Callable[[CheckedComm], Any], *,
                   timeout: float = DEFAULT_TIMEOUT_S, name: str = "sim",
                   return_exceptions: bool = False, join_timeout: float | None = None,
                   **kwargs: Any) -> list[Any]:
    """Run ``fn(comm)`` on ``n`` in-process ranks, one thread each; ``timeout`` is every
    collective's deadline.

    Returns the per-rank return values in rank order. If any rank raised: with
    ``return_exceptions`` the exception takes that rank's place in the list, otherwise
    SimulationError carries ``errors`` and ``results``. A rank still running after
    ``join_timeout`` (default: 10 deadlines, at least 30 s) is reported in SimulationError's
    ``stuck`` (its thread is a daemon and is left behind)."""
    comms = local_group(n, name, timeout=timeout, **kwargs)
    results: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}

    def run(comm: CheckedComm) -> None:
        try:
            results[comm.rank] = fn(comm)
        except Exception as exc:  # reported per rank to the caller
            errors[comm.rank] = exc

    threads = [threading.Thread(target=run, args=(c,), name=f"{name}-rank-{c.rank}",
                                daemon=True) for c in comms]
    for thread in threads:
        thread.start()
    limit = join_timeout if join_timeout is not None else max(30.0, 10 * timeout)
    end = time.monotonic() + limit
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    stuck = [rank for rank, t in enumerate(threads) if t.is_alive()]
    for rank, comm in enumerate(comms):
        if rank not in stuck:
            comm.close()
    if stuck or (errors and not return_exceptions):
        raise SimulationError(errors, results, stuck)
    return [errors[r] if r in errors else results.get(r) for r in range(n)]
