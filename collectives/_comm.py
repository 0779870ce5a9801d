"""CheckedComm: collectives that are recorded, fingerprinted, checked and bounded in time.

Theory of operation. Every call takes the next sequence number, finds its call site (the
first frame outside kvhandoff.collectives), appends an entry to the flight recorder and posts
one wire exchange whose contribution is (fingerprint, payload). When the exchange completes,
every rank holds every rank's fingerprint; if any differ (in seq, op, root, reduce op, site
or tag) every rank raises CollectiveDesyncError and no payload is unpickled or returned.
Waiting is polling a non-blocking exchange against a deadline; past it the call raises
CollectiveTimeoutError with the arrived / missing ranks and their last known positions, and
the flight recorder is dumped to the log. After any failed call the communicator is unusable
(CommClosedError): its peers are out of step, and continuing would only cascade.

A wait reports the earliest failure on the communicator. Non-blocking calls may be posted and
left unwaited; every poll of a handle first progresses the earlier handles still pending on
the same communicator, so a desync of an earlier call (which every rank of that call sees,
since every rank gets every fingerprint) surfaces at once from whichever handle this rank
waits on, and the failed handle's error becomes every later pending handle's error. A
failure only this rank sees (its deadline passed while a peer was merely late; the backend
broke) is told to the peers as an ABORT at this rank's next position: a peer that completes
the failed call and goes on gets CollectiveAbortedError naming this rank within one poll.

Buffer collectives on backends that move raw buffers (MPI, torch.distributed) cannot carry a
fingerprint; there ``buffer_check="preflight"`` first exchanges the fingerprint (with dtype
and shape) as a small object exchange, and ``"off"`` skips the check (the call is still
recorded and bounded in time, but a mismatch is undefined behaviour of the backend). A small
numpy buffer of plain numbers, up to the backend's ``inline_buffer_bytes``, needs neither: it
travels as the payload of its own fingerprint's exchange, one exchange and checked, in both
modes.

The hot path: a blocking call with nothing else pending spins on its exchange and, when the
backend reports that every rank contributed exactly our fingerprint (``agreed()``: on MPI one
byte compare per peer), finishes without a handle; decoding and comparing fingerprints field
by field happens only when they differ (a desync, or tagged calls from different lines).
"""

from __future__ import annotations

import operator
import pickle
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

from . import _buffers, _logging, _watchdog
from ._backend import ABORT, CLOSED, NORMAL, Backend, Contribution
from ._record import (
    Fingerprint,
    FlightRecorder,
    Position,
    RecordEntry,
    call_site,
    summarize,
    summarize_buffer,
)
from .errors import (
    CollectiveAbortedError,
    CollectiveArgumentError,
    CollectiveBackendError,
    CollectiveDesyncError,
    CollectiveError,
    CollectiveTimeoutError,
    CommClosedError,
    PayloadError,
)

REDUCE_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "sum": operator.add,
    "min": lambda a, b: b if b < a else a,
    "max": lambda a, b: b if b > a else a,
    "or": operator.or_,
    "and": operator.and_,
}
BUFFER_CHECK_MODES = ("preflight", "off")
DEFAULT_TIMEOUT_S = 60.0
_SPINS_PER_POLL = 64
_PICKLE = pickle.HIGHEST_PROTOCOL


def _loads_all(payloads: list[Any]) -> list[Any]:
    return list(map(pickle.loads, payloads))


def _nothing(_payloads: list[Any]) -> None:
    return None


def _load_root(root: int, payloads: list[Any]) -> Any:
    return pickle.loads(payloads[root])


def _reduce_all(fn: Callable[[Any, Any], Any] | None, payloads: list[Any]) -> Any:
    # fn is None only for an unknown op, which fails locally before anything is exchanged.
    values = _loads_all(payloads)
    acc = values[0]
    for v in values[1:]:
        acc = fn(acc, v)  # type: ignore[misc]
    return acc


def _any_of(payloads: list[Any]) -> bool:
    return any(_loads_all(payloads))


def _all_of(payloads: list[Any]) -> bool:
    return all(_loads_all(payloads))


def _log_exit(comm: CheckedComm, entry: RecordEntry) -> None:
    comm._log.debug(
        "collective.exit", comm=comm.name, seq=entry.seq, op=entry.op, site=entry.site,
        tag=entry.tag, duration_s=entry.end - entry.start,  # type: ignore[operator]
        state=entry.state)


class CollectiveHandle:
    """A posted collective. ``test()`` never blocks: it returns True once the checked result
    is ready and raises CollectiveDesyncError / CollectiveAbortedError on a mismatch and
    CollectiveTimeoutError once the deadline has passed. ``result()`` returns the value,
    polling until then if needed (bounded by the same deadline). Both also progress the
    earlier calls still pending on the communicator and raise the earliest failure among
    them. Errors are sticky: every later test()/result() raises the same error."""

    __slots__ = ("_announced", "_buffer_stage", "_comm", "_deadline", "_done", "_error",
                 "_exchange", "_finish", "_fp", "_half", "_value", "entry")

    def __init__(self, comm: CheckedComm, entry: RecordEntry, fp: tuple[Any, ...],
                 exchange: Any, finish: Callable[[list[Any]], Any] | None,
                 buffer_stage: Callable[[], Any] | None, deadline_s: float) -> None:
        self._comm = comm
        self.entry = entry
        self._fp = fp
        self._exchange = exchange
        self._finish = finish
        self._buffer_stage = buffer_stage
        now = time.monotonic()
        self._deadline = now + deadline_s
        self._half = now + deadline_s / 2
        self._announced = False
        self._done = False
        self._error: BaseException | None = None
        self._value: Any = None
        comm._inflight.append(self)

    @property
    def done(self) -> bool:
        """True once the result is ready (a later result() returns without waiting)."""
        return self._done

    @property
    def seq(self) -> int:
        return self.entry.seq

    def test(self) -> bool:
        """Progress the collective without blocking; see the class docstring."""
        return self._done or self._poll(1)

    def result(self) -> Any:
        """The checked result; waits (polling, bounded by the deadline) if not ready."""
        if self._done:
            return self._value
        backend = self._comm._backend
        while not self._poll(_SPINS_PER_POLL):
            backend.block(self._exchange, max(0.0, min(0.05, self._deadline - time.monotonic())))
        return self._value

    def _poll(self, spins: int) -> bool:
        if self._done:
            return True
        if self._error is not None:
            raise self._error
        inflight = self._comm._inflight
        if inflight[0] is not self:
            # Earlier calls of this communicator are still pending: progress them first, so
            # that the earliest failure (a desync a peer has already seen) surfaces here now,
            # not at this call's deadline. A failure of one fails every later handle.
            for earlier in tuple(inflight):
                if earlier is self:
                    break
                earlier._step(1)
        return self._step(spins)

    def _step(self, spins: int) -> bool:
        """Progress this call's own exchange (see _poll, which also progresses earlier ones)."""
        try:
            exchange = self._exchange
            # Small collectives complete within microseconds: spin on the exchange alone
            # before paying for clock reads and the deadline logic.
            for _ in range(spins):
                if exchange.test():
                    self._advance()
                    if self._done:
                        return True
                    exchange = self._exchange  # the buffer stage of a preflight call
            now = time.monotonic()
            if now >= self._deadline:
                self._comm._timeout(self.entry, self._fp, self._deadline_s())
            if not self._announced and now >= self._half:
                self._announced = True
                self._comm._backend.announce(self.entry.position())
        except CollectiveError as exc:
            self._comm._fail(self, exc)
            raise
        except (RuntimeError, OSError) as exc:  # what MPI / gloo raise when a peer is gone
            error = self._comm._backend_failed(self.entry, exc)
            self._comm._fail(self, error)
            raise error from exc
        return False

    wait = result

    def _deadline_s(self) -> float:
        return self.entry.deadline - self.entry.start

    def _advance(self) -> None:
        comm = self._comm
        if self._finish is None:
            # Buffer collective stage finished (raw buffer exchange).
            self._value = self._exchange.result()
            self._complete()
            return
        exchange = self._exchange
        payloads = exchange.agreed()
        if payloads is None:
            payloads = comm._check(exchange.contributions(), self._fp, self.entry)
        if self._buffer_stage is not None:
            # Preflight passed: now move the buffers themselves.
            self._exchange = self._buffer_stage()
            self._finish = None
            self._buffer_stage = None
            if self._exchange.test():
                self._advance()
            return
        self._value = self._finish(payloads)
        self._complete()

    def _complete(self) -> None:
        entry = self.entry
        entry.end = time.time()
        entry.state = "completed"
        self._done = True
        inflight = self._comm._inflight
        if inflight[0] is self:
            del inflight[0]
        else:
            inflight.remove(self)
        if _logging._per_call and _logging._log_dir is not None:
            _log_exit(self._comm, entry)


class CheckedComm:
    """A communicator whose every collective is recorded, fingerprinted and bounded in time.

    Build one with ``local_group``/``simulate_ranks`` (in-process), ``CheckedComm.from_mpi``
    or ``CheckedComm.from_torch``. ``name`` appears as ``comm`` in logs; ``rank``/``size`` are
    this rank's index and the group size; ``timeout`` is the default deadline in seconds of
    every call (each call may pass its own ``timeout=``); ``tag=`` on any call replaces the
    call site in the fingerprint. Not thread-safe: one rank, one thread (or one task) at a
    time, as with MPI communicators.
    """

    def __init__(self, backend: Backend, *, name: str, timeout: float = DEFAULT_TIMEOUT_S,
                 buffer_check: str = "preflight", recorder_capacity: int = 256,
                 watchdog: bool = True) -> None:
        if timeout <= 0:
            raise CollectiveArgumentError(f"timeout must be > 0 seconds, got {timeout}")
        if buffer_check not in BUFFER_CHECK_MODES:
            raise CollectiveArgumentError(
                f"buffer_check must be one of {BUFFER_CHECK_MODES}, got {buffer_check!r}")
        self._backend = backend
        self.name = name
        self.rank = backend.rank
        self.size = backend.size
        self.timeout = float(timeout)
        self.buffer_check = buffer_check
        self.recorder = FlightRecorder(recorder_capacity)
        self._record = self.recorder._ring.append  # the hot path's FlightRecorder.start
        self._seq = 0
        self._unusable: str | None = None
        # Posted handles not yet completed or failed, in seq order (see CollectiveHandle._poll).
        self._inflight: list[CollectiveHandle] = []
        # Set once this rank has sent its peers its last word on the wire (an ABORT after a
        # local failure or timeout): close() then sends nothing more.
        self._peers_told = False
        self._log = _logging.rank_logger(backend.log_rank)
        if watchdog:
            _watchdog.register(self)

    # -- constructors -------------------------------------------------------------------

    @classmethod
    def from_mpi(cls, mpi_comm: Any = None, *, name: str = "world",
                 timeout: float = DEFAULT_TIMEOUT_S, **kwargs: Any) -> CheckedComm:
        """Wrap an mpi4py communicator (default COMM_WORLD). The wrapper works on its own
        duplicates (``Dup``), so its traffic never matches the caller's own collectives.
        Collective: every rank of ``mpi_comm`` must call it."""
        from ._mpi import MPIBackend

        return cls(MPIBackend(mpi_comm, name), name=name, timeout=timeout, **kwargs)

    @classmethod
    def from_torch(cls, group: Any = None, *, name: str = "world",
                   timeout: float = DEFAULT_TIMEOUT_S, store: Any = None,
                   **kwargs: Any) -> CheckedComm:
        """Wrap a torch.distributed process group. With ``group=None`` a private gloo group of
        the whole world is created (collective: every rank must call it); a given group is used
        as is, so keep other traffic off it. ``store`` (default: the default group's store)
        carries positions after half a deadline."""
        from ._torch import TorchBackend

        return cls(TorchBackend(group, name, store), name=name, timeout=timeout, **kwargs)

    # -- state --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once close() was called or a call failed (every later call raises)."""
        return self._unusable is not None

    def position(self) -> Position | None:
        """This rank's last position (None before the first call)."""
        return self.recorder.last_position()

    def close(self) -> None:
        """Close this rank's side. Peers that later wait on this rank get
        CollectiveAbortedError naming it instead of waiting for their deadline. Idempotent."""
        if self._unusable == "closed":
            return
        self._unusable = "closed"
        _watchdog.unregister(self)
        if not self._peers_told:
            self._peers_told = True
            self._backend.close(self._seq)

    def dump(self, reason: str = "request") -> list[dict[str, Any]]:
        """Write the flight recorder to the log (``flight_recorder.dump``) and return it."""
        entries = [e.to_dict() for e in self.recorder.entries()]
        self._log.warning("flight_recorder.dump", comm=self.name, reason=reason,
                          entries=entries)
        return entries

    # -- object collectives -------------------------------------------------------------

    def allgather(self, obj: Any, *, tag: str | None = None,
                  timeout: float | None = None) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        return self._post("allgather", obj, tag, timeout, None, None,  # type: ignore[no-any-return]
                          _loads_all, wait=True)

    def iallgather(self, obj: Any, *, tag: str | None = None,
                   timeout: float | None = None) -> CollectiveHandle:
        """Non-blocking allgather."""
        return self._post("allgather", obj, tag, timeout, None, None, _loads_all)

    def gather(self, obj: Any, root: int = 0, *, tag: str | None = None,
               timeout: float | None = None) -> list[Any] | None:
        """Every rank's ``obj`` on ``root`` (None elsewhere). Every rank still checks every
        fingerprint: on the wire this is an allgather, so keep gathered objects small."""
        return self._post("gather", obj, tag, timeout, root, None,  # type: ignore[no-any-return]
                          _loads_all if self.rank == root else _nothing, wait=True)

    def igather(self, obj: Any, root: int = 0, *, tag: str | None = None,
                timeout: float | None = None) -> CollectiveHandle:
        """Non-blocking gather."""
        return self._post("gather", obj, tag, timeout, root, None,
                          _loads_all if self.rank == root else _nothing)

    def bcast(self, obj: Any = None, root: int = 0, *, tag: str | None = None,
              timeout: float | None = None) -> Any:
        """``root``'s ``obj`` on every rank (others' ``obj`` is ignored and not sent)."""
        return self._post("bcast", obj, tag, timeout, root, None, partial(_load_root, root),
                          send=self.rank == root, wait=True)

    def ibcast(self, obj: Any = None, root: int = 0, *, tag: str | None = None,
               timeout: float | None = None) -> CollectiveHandle:
        """Non-blocking bcast."""
        return self._post("bcast", obj, tag, timeout, root, None, partial(_load_root, root),
                          send=self.rank == root)

    def allreduce(self, value: Any, op: str = "sum", *, tag: str | None = None,
                  timeout: float | None = None) -> Any:
        """Reduce every rank's ``value`` with ``op`` (sum, min, max, or, and) in rank order;
        every rank gets the same result."""
        return self._post("allreduce", value, tag, timeout, None, op,
                          partial(_reduce_all, REDUCE_OPS.get(op)), wait=True)

    def iallreduce(self, value: Any, op: str = "sum", *, tag: str | None = None,
                   timeout: float | None = None) -> CollectiveHandle:
        """Non-blocking allreduce."""
        return self._post("allreduce", value, tag, timeout, None, op,
                          partial(_reduce_all, REDUCE_OPS.get(op)))

    def barrier(self, *, tag: str | None = None, timeout: float | None = None) -> None:
        """Return once every rank reached the same barrier."""
        self._post("barrier", None, tag, timeout, None, None, _nothing, send=False, wait=True)

    def ibarrier(self, *, tag: str | None = None,
                 timeout: float | None = None) -> CollectiveHandle:
        """Non-blocking barrier."""
        return self._post("barrier", None, tag, timeout, None, None, _nothing, send=False)

    def any(self, flag: bool, *, tag: str | None = None, timeout: float | None = None) -> bool:
        """True on every rank if ``flag`` is true on any rank: the gate to put in front of a
        collective that only some ranks locally want (seed 001)."""
        return bool(self._post("any", bool(flag), tag, timeout, None, "or", _any_of,
                               wait=True))

    def iany(self, flag: bool, *, tag: str | None = None,
             timeout: float | None = None) -> CollectiveHandle:
        """Non-blocking any."""
        return self._post("any", bool(flag), tag, timeout, None, "or", _any_of)

    def all(self, flag: bool, *, tag: str | None = None, timeout: float | None = None) -> bool:
        """True on every rank if ``flag`` is true on every rank."""
        return bool(self._post("all", bool(flag), tag, timeout, None, "and", _all_of,
                               wait=True))

    def iall(self, flag: bool, *, tag: str | None = None,
             timeout: float | None = None) -> CollectiveHandle:
        """Non-blocking all."""
        return self._post("all", bool(flag), tag, timeout, None, "and", _all_of)

    # -- buffer collectives -------------------------------------------------------------

    def allgather_buffer(self, buffer: Any, *, tag: str | None = None,
                         timeout: float | None = None) -> Any:
        """Stack every rank's buffer (numpy array or torch tensor, same dtype and shape on
        every rank) into a new leading axis of length ``size``."""
        return self._post_buffer("allgather_buffer", buffer, None, tag, timeout, wait=True)

    def iallgather_buffer(self, buffer: Any, *, tag: str | None = None,
                          timeout: float | None = None) -> CollectiveHandle:
        """Non-blocking allgather_buffer."""
        return self._post_buffer("allgather_buffer", buffer, None, tag, timeout)

    def allreduce_buffer(self, buffer: Any, op: str = "sum", *, tag: str | None = None,
                         timeout: float | None = None) -> Any:
        """Elementwise reduction (sum, min, max) of every rank's buffer; returns a new buffer."""
        return self._post_buffer("allreduce_buffer", buffer, op, tag, timeout, wait=True)

    def iallreduce_buffer(self, buffer: Any, op: str = "sum", *, tag: str | None = None,
                          timeout: float | None = None) -> CollectiveHandle:
        """Non-blocking allreduce_buffer."""
        return self._post_buffer("allreduce_buffer", buffer, op, tag, timeout)

    # -- machinery ----------------------------------------------------------------------

    def _begin(self, op: str, summary: str, tag: str | None, timeout: float | None,
               root: int | None, reduce_op: str | None,
               extra: tuple[Any, ...] | None) -> tuple[RecordEntry, tuple[Any, ...], float]:
        if self._unusable is not None:
            raise CommClosedError(self.name, self.rank, self._unusable)
        site = call_site(3)
        seq = self._seq
        self._seq = seq + 1
        deadline_s = self.timeout if timeout is None else float(timeout)
        now = time.time()
        entry = RecordEntry(seq, op, site, tag, summary, now, now + deadline_s)
        self._record(entry)
        fp = (seq, op, site, tag, root, reduce_op, extra)
        if _logging._per_call and _logging._log_dir is not None:
            self._log.debug("collective.enter", comm=self.name, seq=seq, op=op, site=site,
                            tag=tag, root=root, reduce_op=reduce_op, summary=entry.summary)
        return entry, fp, deadline_s

    def _validate(self, root: int | None, reduce_op: str | None, tag: str | None,
                  timeout: float | None) -> str | None:
        if root is None and reduce_op is None and tag is None and timeout is None:
            return None
        if root is not None and not (isinstance(root, int) and 0 <= root < self.size):
            return f"root must be a rank in [0, {self.size}), got {root!r}"
        if reduce_op is not None and reduce_op not in REDUCE_OPS:
            return f"reduce op must be one of {sorted(REDUCE_OPS)}, got {reduce_op!r}"
        if tag is not None and not isinstance(tag, str):
            return f"tag must be a str, got {type(tag).__name__}"
        if timeout is not None and not timeout > 0:
            return f"timeout must be > 0 seconds, got {timeout!r}"
        return None

    def _post(self, op: str, obj: Any, tag: str | None, timeout: float | None,
              root: int | None, reduce_op: str | None, finish: Callable[[list[Any]], Any],
              send: bool = True, wait: bool = False) -> Any:
        """Post one object collective: its handle, or with ``wait`` its checked value."""
        if root is None and reduce_op is None and timeout is None and (
                tag is None or type(tag) is str):
            problem = None  # the common calls: nothing to validate
        else:
            problem = self._validate(root, reduce_op, tag, timeout)
        entry, fp, deadline_s = self._begin(op, summarize(obj), tag,
                                            None if problem else timeout, root, reduce_op, None)
        if problem is not None:
            self._fail_locally(entry, fp, CollectiveArgumentError(problem))
        try:
            payload = pickle.dumps(obj, _PICKLE) if send else b""
        except Exception as exc:  # pickling raises many types: surface one typed error
            self._fail_locally(entry, fp, PayloadError(
                f"{op} payload {entry.summary} at {entry.site} cannot be pickled ({exc}); "
                "send plain data (numbers, strings, lists, dicts, dataclasses)", exc))
        exchange = self._backend.post(entry.seq, NORMAL, fp, payload)
        if wait:
            return self._wait(entry, fp, exchange, finish, deadline_s)
        return CollectiveHandle(self, entry, fp, exchange, finish, None, deadline_s)

    def _wait(self, entry: RecordEntry, fp: tuple[Any, ...], exchange: Any,
              finish: Callable[[list[Any]], Any], deadline_s: float) -> Any:
        """A blocking call's wait. With nothing else pending on this communicator, spin on the
        exchange and finish here when every rank made exactly this call (the common case:
        no handle, no clock read); anything else (a longer wait, a mismatch to report,
        earlier calls to progress) is a handle's result()."""
        if not self._inflight:
            try:
                for _ in range(_SPINS_PER_POLL):
                    if exchange.test():
                        payloads = exchange.agreed()
                        if payloads is None:
                            break
                        value = finish(payloads)
                        entry.end = time.time()
                        entry.state = "completed"
                        if _logging._per_call and _logging._log_dir is not None:
                            _log_exit(self, entry)
                        return value
            except (RuntimeError, OSError) as exc:  # what MPI / gloo raise when a peer is gone
                raise self._backend_failed(entry, exc) from exc
        return CollectiveHandle(self, entry, fp, exchange, finish, None, deadline_s).result()

    def _post_buffer(self, op: str, buffer: Any, reduce_op: str | None, tag: str | None,
                     timeout: float | None, wait: bool = False) -> Any:
        """Post one buffer collective: its handle, or with ``wait`` its result."""
        problem = (None if tag is None and timeout is None
                   else self._validate(None, None, tag, timeout))
        extra: tuple[Any, ...] | None = None
        if problem is None:
            try:
                extra = _buffers.describe(buffer)
                if reduce_op is not None:
                    _buffers.check_reduce_op(reduce_op)
            except CollectiveArgumentError as exc:
                problem = str(exc)
        summary = (summarize_buffer(extra) if extra is not None
                   else type(buffer).__name__)
        entry, fp, deadline_s = self._begin(op, summary, tag, None if problem else timeout,
                                            None, reduce_op, extra)
        if problem is not None:
            self._fail_locally(entry, fp, CollectiveArgumentError(problem))
        backend = self._backend
        finish: Callable[[list[Any]], Any]
        if backend.piggyback_buffers:
            copy = _buffers.copy(buffer)
            if reduce_op is None:
                finish = _buffers.stack
            else:
                finish = partial(_buffers.reduce, reduce_op=reduce_op)
            exchange = backend.post(entry.seq, NORMAL, fp, copy)
        else:
            assert extra is not None  # else _fail_locally raised
            if _buffers.inline_numpy(buffer, extra, backend.inline_buffer_bytes):
                # A small buffer rides with its fingerprint, in either buffer_check mode: one
                # exchange, checked. The choice depends only on (dtype, shape), which the
                # check compares, and the rows are used only once every fingerprint agrees.
                finish = partial(_buffers.rows_to_result, buffer.dtype, extra[2], reduce_op)
                exchange = backend.post(entry.seq, NORMAL, fp, buffer.tobytes(), True)
            else:
                def post_buffer() -> Any:
                    if reduce_op is None:
                        return backend.post_buffer_allgather(buffer)
                    return backend.post_buffer_allreduce(buffer, reduce_op)

                if self.buffer_check == "off":
                    handle = CollectiveHandle(self, entry, fp, post_buffer(), None, None,
                                              deadline_s)
                    return handle.result() if wait else handle
                # Preflight: the fingerprint first, then the buffers themselves.
                exchange = backend.post(entry.seq, NORMAL, fp, b"")
                handle = CollectiveHandle(self, entry, fp, exchange, _nothing, post_buffer,
                                          deadline_s)
                return handle.result() if wait else handle
        if wait:
            return self._wait(entry, fp, exchange, finish, deadline_s)
        return CollectiveHandle(self, entry, fp, exchange, finish, None, deadline_s)

    def _fail_locally(self, entry: RecordEntry, fp: tuple[Any, ...],
                      error: CollectiveError) -> None:
        """Tell peers this call failed here (so they raise instead of waiting), then raise."""
        entry.state = "failed"
        entry.end = time.time()
        self._unusable = f"call seq {entry.seq} failed on this rank: {error}"
        self._peers_told = True
        self._backend.post(entry.seq, ABORT, (fp, str(error).splitlines()[0]), b"")
        raise error

    def _fail(self, handle: CollectiveHandle, error: CollectiveError) -> None:
        """``handle`` failed with ``error``: it and every later pending handle keep that error
        (the earliest failure is what any later wait reports)."""
        inflight = self._inflight
        at = next((i for i, h in enumerate(inflight) if h is handle), None)
        if at is None:
            return  # already failed through an earlier handle
        now = time.time()
        for later in inflight[at:]:
            later._error = error
            if later is not handle and later.entry.state == "pending":
                later.entry.state = "failed"
                later.entry.end = now
        del inflight[at:]

    def _tell_peers(self, entry: RecordEntry, why: str) -> None:
        """After a failure only this rank saw (a timeout, a backend error): post an ABORT at
        this rank's next position, so a peer that completes the failed call and goes on gets
        CollectiveAbortedError naming this rank at once instead of waiting out a deadline.
        (A desync or an abort needs no word: every rank sees the same contributions.)"""
        if self._peers_told:
            return
        self._peers_told = True
        reason = f"collective seq {entry.seq} {entry.op} at {entry.site} {why} on this rank"
        try:
            self._backend.post(self._seq, ABORT, ((self._seq,), reason), b"")
        except (RuntimeError, OSError):
            pass  # best effort: the backend is what failed

    def _check(self, contributions: list[Contribution], fp: tuple[Any, ...],
               entry: RecordEntry) -> list[Any]:
        """Compare every rank's fingerprint with ours; return the payloads if all agree."""
        payloads = []
        identical = True
        for kind, header, payload in contributions:
            if kind != NORMAL:
                identical = False
                break
            if header != fp:
                identical = False
            payloads.append(payload)
        if identical:
            return payloads
        reasons: dict[int, str] = {}
        for peer, (kind, header, _payload) in enumerate(contributions):
            if kind == ABORT:
                reasons[peer] = header[1]
            elif kind == CLOSED:
                reasons[peer] = "closed the communicator"
        if reasons:
            entry.state = "failed"
            entry.end = time.time()
            self._unusable = f"collective seq {entry.seq} aborted by ranks {sorted(reasons)}"
            raise CollectiveAbortedError(self.name, self.rank, entry.seq, reasons)
        headers = {peer: Fingerprint.from_wire(header)
                   for peer, (_kind, header, _payload) in enumerate(contributions)}
        keys = {peer: f.key() for peer, f in headers.items()}
        if len(set(keys.values())) == 1:
            return payloads  # tagged calls from different lines: they agree
        self._desync(entry, headers, keys)
        raise AssertionError("unreachable")  # _desync always raises

    def _backend_failed(self, entry: RecordEntry, cause: BaseException) -> CollectiveError:
        entry.state = "failed"
        entry.end = time.time()
        self._unusable = f"the backend failed in collective seq {entry.seq}"
        self._tell_peers(entry, f"failed in the backend ({type(cause).__name__})")
        return CollectiveBackendError(self.name, self.rank, entry.seq, cause)

    def _desync(self, entry: RecordEntry, headers: dict[int, Fingerprint],
                keys: dict[int, tuple[Any, ...]]) -> None:
        majority_key = Counter(keys.values()).most_common(1)[0][0]
        expected = next(headers[p] for p in sorted(headers) if keys[p] == majority_key)
        mismatched = [p for p in sorted(keys) if keys[p] != majority_key]
        entry.state = "desync"
        entry.end = time.time()
        self._unusable = f"collective seq {entry.seq} was desynchronized"
        self._log.error(
            "collective.desync", comm=self.name, seq=entry.seq, op=entry.op, site=entry.site,
            tag=entry.tag, ranks={str(p): f.to_dict() for p, f in sorted(headers.items())},
            mismatched_ranks=mismatched)
        self.dump("desync")
        raise CollectiveDesyncError(self.name, self.rank, entry.seq, headers, expected,
                                    mismatched)

    def _timeout(self, entry: RecordEntry, fp: tuple[Any, ...], deadline_s: float) -> None:
        entry.state = "timeout"
        entry.end = time.time()
        self._unusable = f"collective seq {entry.seq} timed out"
        self._tell_peers(entry, f"timed out after {deadline_s:g}s")
        backend = self._backend
        mine = entry.position()
        backend.announce(mine)
        positions = backend.positions()
        positions[self.rank] = mine
        arrived = backend.arrived(entry.seq, positions)
        arrived.add(self.rank)
        missing = [r for r in range(self.size) if r not in arrived]
        self._log.error(
            "collective.timeout", comm=self.name, seq=entry.seq, op=entry.op, site=entry.site,
            tag=entry.tag, deadline_s=deadline_s, arrived=sorted(arrived), missing=missing,
            # Ranks whose position is unknown are left out (the schema's values are objects).
            positions={str(r): p.to_dict() for r, p in sorted(positions.items())
                       if p is not None})
        self.dump("timeout")
        raise CollectiveTimeoutError(self.name, self.rank, entry.seq, entry.op, entry.site,
                                     deadline_s, sorted(arrived), missing, positions)
