"""The mpi4py backend (the only module that imports mpi4py).

Wire protocol of one checked call, on a private duplicate of the caller's communicator, with
point-to-point messages to every peer (MPI orders messages of one (source, tag, comm), so the
k-th message of every peer is its k-th call, exactly as the k-th collectives would match):

1. a fixed-size *slot* (tag 1): a 9-byte prefix (kind, header length, payload length), the
   pickled fingerprint and, when it fits, the pickled payload;
2. when the body does not fit, the body itself (tag 2), sent right after the slot; a receiver
   that sees an oversized slot always receives the body, whatever it thinks of the
   fingerprint, so the streams never drift.

Every checked operation uses this same exchange, which is why ranks that issue *different*
operations still meet and compare fingerprints instead of hanging. Point-to-point is used
instead of ``Iallgather`` because MPICH's non-blocking collectives cost several times its
blocking ones, while ``Isend``/``Irecv`` over shared memory cost about what mpi4py's own
``allgather`` does; the price is size - 1 messages per rank per call, fine for the small TP
groups this is for. Buffer collectives move raw buffers the same way (tag 3; allreduce is a
gather plus a reduction in rank order, identical on every rank). Positions travel on a second
duplicate (tag 7), only after half of a deadline has passed.
"""

from __future__ import annotations

import os
import pickle
import struct
import time
from typing import Any

from . import _buffers
from ._backend import CLOSED, NORMAL, Contribution
from ._record import Position
from .errors import BackendUnavailableError

try:
    from mpi4py import MPI
except ImportError as exc:
    raise BackendUnavailableError(
        "the MPI backend needs mpi4py: install with `pip install kvhandoff[mpi]`"
    ) from exc

SLOT_BYTES = 512
_PREFIX = struct.Struct("<BII")
_SLOT_TAG = 1
_BODY_TAG = 2
_BUFFER_TAG = 3
_POSITION_TAG = 7
_SPIN_TESTS = 2000  # busy polls before a blocking wait starts to sleep


class _MPIExchange:
    __slots__ = (
        "_bodies",
        "_body",
        "_body_reqs",
        "_phase",
        "_prefixes",
        "_rank",
        "_recvs",
        "_slots",
        "_src",
        "polls",
    )

    def __init__(self, backend: MPIBackend, kind: int, header: bytes, payload: Any,
                 receive: bool = True) -> None:
        comm = backend._comm
        rank, size = backend.rank, backend.size
        self._rank = rank
        self.polls = 0
        hlen, plen = len(header), len(payload)
        slots = bytearray(SLOT_BYTES * size)
        base = rank * SLOT_BYTES
        _PREFIX.pack_into(slots, base, kind, hlen, plen)
        inline = _PREFIX.size + hlen + plen <= SLOT_BYTES
        if inline:
            slots[base + _PREFIX.size:base + _PREFIX.size + hlen] = header
            slots[base + _PREFIX.size + hlen:base + _PREFIX.size + hlen + plen] = payload
            self._body: bytes = b""
        else:
            self._body = header + bytes(payload)
        self._slots = slots
        view = memoryview(slots)
        mine = view[base:base + SLOT_BYTES]
        peers = [r for r in range(size) if r != rank]
        # A rank that aborts or closes never waits for this call: it only sends.
        self._recvs = [comm.Irecv([view[r * SLOT_BYTES:(r + 1) * SLOT_BYTES], MPI.BYTE],
                                  source=r, tag=_SLOT_TAG) for r in peers] if receive else []
        sends = [comm.Isend([mine, MPI.BYTE], dest=r, tag=_SLOT_TAG) for r in peers]
        if not inline:
            sends += [comm.Isend([self._body, MPI.BYTE], dest=r, tag=_BODY_TAG) for r in peers]
        backend._track(sends)
        self._src = comm
        self._body_reqs: list[Any] = []
        self._bodies: dict[int, bytearray] = {}
        self._prefixes: list[tuple[int, int, int]] = []
        self._phase = 1

    def test(self) -> bool:
        if self._phase == 3:
            return True
        self.polls += 1
        if self._phase == 1:
            if not MPI.Request.Testall(self._recvs):
                return False
            slots = self._slots
            self._prefixes = [_PREFIX.unpack_from(slots, r * SLOT_BYTES)
                              for r in range(len(slots) // SLOT_BYTES)]
            for r, (_kind, hlen, plen) in enumerate(self._prefixes):
                if r != self._rank and _PREFIX.size + hlen + plen > SLOT_BYTES:
                    buf = self._bodies[r] = bytearray(hlen + plen)
                    self._body_reqs.append(
                        self._src.Irecv([buf, MPI.BYTE], source=r, tag=_BODY_TAG))
            self._phase = 2
        if not MPI.Request.Testall(self._body_reqs):
            return False
        self._phase = 3
        return True

    def contributions(self) -> list[Contribution]:
        out: list[Contribution] = []
        view = memoryview(self._slots)
        for rank, (kind, hlen, plen) in enumerate(self._prefixes):
            if _PREFIX.size + hlen + plen <= SLOT_BYTES:
                base = rank * SLOT_BYTES + _PREFIX.size
                body: Any = view[base:base + hlen + plen]
            elif rank == self._rank:
                body = memoryview(self._body)
            else:
                body = memoryview(self._bodies[rank])
            header = pickle.loads(body[:hlen]) if kind != CLOSED else None
            out.append((kind, header, body[hlen:]))
        return out


class _MPIBufferExchange:
    """Every rank's buffer, moved point-to-point; the result is stacked or reduced."""

    __slots__ = ("_gathered", "_recvs", "_reduce_op", "_to_torch", "polls")

    def __init__(self, backend: MPIBackend, buffer: Any, reduce_op: str | None) -> None:
        import numpy as np

        if type(buffer).__module__.startswith("torch"):
            send, self._to_torch = buffer.detach().cpu().contiguous().numpy(), True
        else:
            send, self._to_torch = np.ascontiguousarray(buffer), False
        comm = backend._comm
        gathered = np.empty((backend.size, *send.shape), dtype=send.dtype)
        gathered[backend.rank] = send
        peers = [r for r in range(backend.size) if r != backend.rank]
        self._recvs = [comm.Irecv(gathered[r], source=r, tag=_BUFFER_TAG) for r in peers]
        backend._track([comm.Isend(send, dest=r, tag=_BUFFER_TAG) for r in peers])
        self._gathered = gathered
        self._reduce_op = reduce_op
        self.polls = 0

    def test(self) -> bool:
        self.polls += 1
        return bool(MPI.Request.Testall(self._recvs))

    def result(self) -> Any:
        import numpy as np

        out = self._gathered
        if self._reduce_op is not None:
            fn = {"sum": np.add, "min": np.minimum, "max": np.maximum}[self._reduce_op]
            acc = out[0].copy()
            for row in out[1:]:
                fn(acc, row, out=acc)
            out = acc
        return _buffers.numpy_to_torch(out) if self._to_torch else out


class MPIBackend:
    """A checked view of an mpi4py communicator (collective to create)."""

    piggyback_buffers = False

    def __init__(self, mpi_comm: Any, name: str) -> None:
        base = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self._comm = base.Dup()
        self._side = base.Dup()
        self._comm.Set_name(f"kvhandoff:{name}")
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        self.log_rank = MPI.COMM_WORLD.Get_rank()
        self._known: dict[int, Position] = {}
        self._sends: list[Any] = []

    def _track(self, sends: list[Any]) -> None:
        # Sends complete on their own (eagerly for small messages); keep them referenced
        # until they do, and reap the finished ones on every call.
        pending = self._sends
        if pending:
            pending = [r for r in pending if not r.Test()]
        pending.extend(sends)
        self._sends = pending

    def post(self, seq: int, kind: int, header: tuple[Any, ...], payload: Any) -> _MPIExchange:
        return _MPIExchange(self, kind, pickle.dumps(header, pickle.HIGHEST_PROTOCOL), payload,
                            receive=kind == NORMAL)

    def post_buffer_allgather(self, buffer: Any) -> _MPIBufferExchange:
        return _MPIBufferExchange(self, buffer, None)

    def post_buffer_allreduce(self, buffer: Any, reduce_op: str) -> _MPIBufferExchange:
        return _MPIBufferExchange(self, buffer, reduce_op)

    def block(self, exchange: Any, max_s: float) -> None:
        # Spin first (latency of small collectives), then yield the core in short sleeps.
        if exchange is not None and exchange.polls < _SPIN_TESTS:
            # Give the core away between spins: with more ranks than free cores, the peer we
            # wait for may need exactly this one.
            os.sched_yield()
            return
        time.sleep(min(max_s, 0.0005))

    def announce(self, position: Position) -> None:
        self._track([self._side.isend(position.to_wire(), dest=peer, tag=_POSITION_TAG)
                     for peer in range(self.size) if peer != self.rank])

    def positions(self) -> dict[int, Position | None]:
        status = MPI.Status()
        while self._side.iprobe(source=MPI.ANY_SOURCE, tag=_POSITION_TAG, status=status):
            source = status.Get_source()
            wire = self._side.recv(source=source, tag=_POSITION_TAG)
            self._known[source] = Position(*wire)
        return {r: self._known.get(r) for r in range(self.size)}

    def arrived(self, seq: int, positions: dict[int, Position | None]) -> set[int]:
        return {r for r, p in positions.items()
                if p is not None and p.seq == seq and p.state in ("pending", "timeout")}

    def close(self, seq: int) -> None:
        # Peers that wait on this rank later match this contribution and raise
        # CollectiveAbortedError instead of waiting for their deadline; only its sends matter.
        _MPIExchange(self, CLOSED, b"", b"", receive=False)
