"""The mpi4py backend (the only module that imports mpi4py).

Wire protocol of one checked call, on a private duplicate of the caller's communicator, with
point-to-point messages to every peer (MPI orders messages of one (source, tag, comm), so the
k-th message of every peer is its k-th call, exactly as the k-th collectives would match):

1. a fixed-size *slot* (tag 1): an 18-byte prefix (payload length, kind, header format, seq,
   header length), the pickled fingerprint less its seq (pickled once per distinct
   fingerprint) and, when it fits, the pickled payload. Everything from the kind to the end
   of the fingerprint is one *packed fingerprint*: a peer whose slot starts with our bytes
   (one ``startswith`` per peer; from the payload length on for a checked inline buffer,
   whose length must agree too) made exactly our call, and its payload is handed out
   without decoding any header; anything else is decoded and checked field by field.
   Slots live in pooled *channels* with persistent requests, so a call costs two
   ``Start``s per peer instead of building fresh requests;
2. when the body does not fit, the body itself (tag 2), sent right after the slot; a receiver
   that sees an oversized slot always receives the body, whatever it thinks of the
   fingerprint, so the streams never drift.

Every checked operation uses this same exchange, which is why ranks that issue *different*
operations still meet and compare fingerprints instead of hanging. Point-to-point is used
instead of ``Iallgather`` because MPICH's non-blocking collectives cost several times its
blocking ones, while ``Isend``/``Irecv`` over shared memory cost about what mpi4py's own
``allgather`` does; the price is size - 1 messages per rank per call, fine for the small TP
groups this is for. Buffer collectives move raw buffers the same way (tag 3; allreduce is a
gather plus a reduction in rank order, identical on every rank); a numpy buffer of plain
numbers of at most ``_INLINE_BUFFER_BYTES`` skips that and rides as the payload of its
fingerprint's slot, in either ``buffer_check`` mode (so it is checked even with the preflight
off).
Positions travel on a second duplicate (tag 7), only after half of a deadline has passed.
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
# payload length, kind, header format, seq, header length: the payload length comes first, so
# that the rest of the prefix and the header bytes that follow are one packed fingerprint.
_PREFIX = struct.Struct("<IBBqI")
_PLEN = struct.Struct("<I")
_FULL = 0  # the header is the pickled header tuple
_STATIC = 1  # flag: the header is (seq,) + the pickled rest: seq travels in the prefix
_INLINE = 2  # flag: header and payload are in the slot (so a peer whose packed fingerprint
#              equals ours has its payload in its slot too)
_SLOT_TAG = 1
_BODY_TAG = 2
_BUFFER_TAG = 3
_POSITION_TAG = 7
# A blocking wait first spins (small collectives complete within microseconds, and MPICH's
# own blocking collectives spin too), then yields the core between polls (with more ranks
# than free cores, the peer we wait for may need exactly this one), then sleeps.
_SPIN_S = 0.0002
_YIELD_S = 0.002
_HEADER_CACHE_MAX = 4096
_FREE_CHANNELS = 8
# Numpy buffers of plain numbers up to this size travel inline in the fingerprint's slot
# instead of in a raw-buffer exchange (after a preflight, or unchecked).
_INLINE_BUFFER_BYTES = 256


class _Channel:
    """The reusable part of an exchange: every rank's slot and persistent requests (one
    receive into each peer's slot, one send of ours to each peer). ``Start`` on a persistent
    request costs a fraction of building an ``Irecv``/``Isend`` each call; matching order is
    the order of ``Start``, exactly as with fresh requests. A channel serves one exchange at
    a time; the backend pools the free ones."""

    __slots__ = ("recvs", "sends", "slots")

    def __init__(self, backend: MPIBackend) -> None:
        comm = backend._comm
        rank, size = backend.rank, backend.size
        self.slots = bytearray(SLOT_BYTES * size)
        view = memoryview(self.slots)
        peers = [r for r in range(size) if r != rank]
        self.recvs = [comm.Recv_init(view[r * SLOT_BYTES:(r + 1) * SLOT_BYTES], r, _SLOT_TAG)
                      for r in peers]
        mine = view[rank * SLOT_BYTES:(rank + 1) * SLOT_BYTES]
        self.sends = [comm.Send_init(mine, r, _SLOT_TAG) for r in peers]

    def sent(self) -> bool:
        for request in self.sends:
            if not request.Test():
                return False
        return True

    def free(self) -> None:
        for request in self.recvs + self.sends:
            request.Free()


class _MPIExchange:
    # Phases: 1 slots in flight, 2 bodies in flight, 3 complete, 4 complete and every peer
    # made exactly our call (agreed()). Attributes only the slow path reads (_prefixes,
    # _bodies, _body_reqs, _body) are set where that path starts.
    __slots__ = (
        "_backend",
        "_bodies",
        "_body",
        "_body_reqs",
        "_channel",
        "_header",
        "_key",
        "_phase",
        "_plen",
        "_prefixes",
        "_same_len",
        "_static",
        "waiting_since",
    )

    def __init__(self, backend: MPIBackend, seq: int, kind: int, header: Any, payload: Any,
                 receive: bool = True, same_len: bool = False) -> None:
        self._backend = backend
        self._header = header
        self._same_len = same_len
        self.waiting_since = 0.0
        static: bytes | None = None
        if kind == NORMAL:
            # Inline of _static_header's cache hit (the hot path).
            try:
                static = backend._headers.get(header[1:]) if header[0] == seq else None
            except TypeError:  # an unhashable part
                static = None
            if static is None:
                static = backend._static_header(seq, header)
        self._static = static
        if static is not None:
            fmt, header_bytes = _STATIC, static
        else:
            fmt = _FULL
            header_bytes = (pickle.dumps(header, pickle.HIGHEST_PROTOCOL)
                            if header is not None else b"")
        hlen = len(header_bytes)
        self._plen = plen = len(payload)
        free = backend._free
        channel = free.pop() if free and not backend._draining else backend._channel()
        self._channel: _Channel | None = channel
        slots = channel.slots
        base = backend.rank * SLOT_BYTES
        start = base + _PREFIX.size
        inline = _PREFIX.size + hlen + plen <= SLOT_BYTES
        _PREFIX.pack_into(slots, base, plen, kind, (fmt | _INLINE) if inline else fmt, seq, hlen)
        if inline:
            slots[start:start + hlen] = header_bytes
            slots[start + hlen:start + hlen + plen] = payload
            # The packed fingerprint: kind, format, seq, header length and the header bytes
            # (from the payload length on when every rank's must be equal). A peer whose slot
            # starts with the same bytes made exactly our call: one compare per peer.
            self._key: bytearray | None = (
                slots[base + (0 if same_len else _PLEN.size):start + hlen]
                if static is not None else None)
            body = None
        else:
            self._body = body = header_bytes + bytes(payload)
            self._key = None
        # A rank that aborts or closes never waits for this call: it only sends.
        if receive:
            for request in channel.recvs:
                request.Start()
        for request in channel.sends:
            request.Start()
        if body is not None:
            comm = backend._comm
            backend._track([comm.Isend(body, r, _BODY_TAG)
                            for r in range(backend.size) if r != backend.rank])
        self._phase = 1
        if not receive:  # nothing to wait for: the channel only has sends in flight
            backend._release(channel)
            self._channel = None
            self._phase = 3

    def test(self) -> bool:
        phase = self._phase
        if phase >= 3:
            return True
        if phase == 1:
            channel = self._channel
            assert channel is not None
            # Request.Test per request is several times cheaper than Request.Testall on a
            # list; a completed persistent request is inactive, and testing it again is a
            # cheap True.
            for request in channel.recvs:
                if not request.Test():
                    return False
            slots = channel.slots
            key = self._key
            if key is not None:
                at = 0 if self._same_len else _PLEN.size
                for base in self._backend._peer_bases:
                    if not slots.startswith(key, base + at):
                        break
                else:
                    self._phase = 4
                    return True
            self._slow_path(slots)
        body_reqs = self._body_reqs
        while body_reqs:
            if not body_reqs[-1].Test():
                return False
            body_reqs.pop()
        self._phase = 3
        return True

    def _slow_path(self, slots: bytearray) -> None:
        """Decode every prefix and receive the bodies that did not fit (phase 2)."""
        self._prefixes = [_PREFIX.unpack_from(slots, r * SLOT_BYTES)
                          for r in range(len(slots) // SLOT_BYTES)]
        self._bodies: dict[int, bytearray] = {}
        self._body_reqs: list[Any] = []
        own = self._backend.rank
        for r, (plen, _kind, _fmt, _seq, hlen) in enumerate(self._prefixes):
            if r != own and _PREFIX.size + hlen + plen > SLOT_BYTES:
                buf = self._bodies[r] = bytearray(hlen + plen)
                self._body_reqs.append(self._backend._comm.Irecv(buf, r, _BODY_TAG))
        self._phase = 2

    def agreed(self) -> list[Any] | None:
        """Every rank's payload when every peer's slot starts with our packed fingerprint, else
        None: then contributions() has every rank's header for the full check."""
        if self._phase != 4:
            return None
        channel = self._channel
        assert channel is not None and self._static is not None
        slots = channel.slots
        backend = self._backend
        off = _PREFIX.size + len(self._static)
        if self._same_len:
            end = off + self._plen
            out = [slots[base + off:base + end] for base in backend._bases]
        else:
            # Equal packed fingerprints include the inline flag: every payload is in its slot.
            unpack = _PLEN.unpack_from
            out = [slots[base + off:base + off + unpack(slots, base)[0]]
                   for base in backend._bases]
        self._channel = None
        for request in channel.sends:  # inline of _release and _keep
            if not request.Test():
                backend._draining.append(channel)
                return out
        free = backend._free
        if len(free) < _FREE_CHANNELS:
            free.append(channel)
        else:
            channel.free()
        return out

    def contributions(self) -> list[Contribution]:
        """Every rank's (kind, header, payload); payloads are copied out of the channel,
        which goes back to the pool."""
        out: list[Contribution] = []
        channel = self._channel
        assert channel is not None and self._phase >= 3
        if self._phase == 4:  # every header equals ours
            payloads = self.agreed()
            assert payloads is not None
            return [(NORMAL, self._header, payload) for payload in payloads]
        slots = channel.slots
        static, own = self._static, self._backend.rank
        seq = self._header[0] if static is not None else None
        for rank, (plen, kind, fmt, peer_seq, hlen) in enumerate(self._prefixes):
            base = rank * SLOT_BYTES + _PREFIX.size
            inline = _PREFIX.size + hlen + plen <= SLOT_BYTES
            if inline:
                body: Any = slots
                at = base
            elif rank == own:
                body, at = self._body, 0
            else:
                body, at = self._bodies[rank], 0
            if rank == own:
                header: Any = self._header
            elif kind == CLOSED:
                header = None
            elif fmt & _STATIC:
                # Same bytes as ours means an equal fingerprint: hand back our own tuple and
                # skip unpickling; anything else is decoded and compared as a tuple.
                if (static is not None and peer_seq == seq and hlen == len(static)
                        and body.startswith(static, at)):
                    header = self._header
                else:
                    header = (peer_seq, *pickle.loads(body[at:at + hlen]))
            else:
                header = pickle.loads(body[at:at + hlen])
            out.append((kind, header, body[at + hlen:at + hlen + plen]))
        self._channel = None
        self._backend._release(channel)
        return out


class _MPIBufferExchange:
    """Every rank's buffer, moved point-to-point; the result is stacked or reduced."""

    __slots__ = ("_gathered", "_recvs", "_reduce_op", "_to_torch", "waiting_since")

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
        self.waiting_since = 0.0

    def test(self) -> bool:
        recvs = self._recvs
        while recvs:
            if not recvs[-1].Test():
                return False
            recvs.pop()
        return True

    def result(self) -> Any:
        out = _buffers.stacked_result(self._gathered, self._reduce_op)
        return _buffers.numpy_to_torch(out) if self._to_torch else out


class MPIBackend:
    """A checked view of an mpi4py communicator (collective to create)."""

    piggyback_buffers = False
    inline_buffer_bytes = _INLINE_BUFFER_BYTES

    def __init__(self, mpi_comm: Any, name: str) -> None:
        base = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self._comm = base.Dup()
        self._side = base.Dup()
        self._comm.Set_name(f"kvhandoff:{name}")
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        self.log_rank = MPI.COMM_WORLD.Get_rank()
        # Where each rank's slot starts in a channel (all ranks; peers only).
        self._bases = [r * SLOT_BYTES for r in range(self.size)]
        self._peer_bases = [r * SLOT_BYTES for r in range(self.size) if r != self.rank]
        self._known: dict[int, Position] = {}
        self._sends: list[Any] = []
        self._headers: dict[tuple[Any, ...], bytes] = {}
        self._free: list[_Channel] = []  # idle channels, their sends complete
        self._draining: list[_Channel] = []  # released channels whose sends may be in flight

    def _channel(self) -> _Channel:
        if self._draining:
            still = []
            for channel in self._draining:
                if channel.sent():
                    self._keep(channel)
                else:
                    still.append(channel)
            self._draining = still
        free = self._free
        return free.pop() if free else _Channel(self)

    def _release(self, channel: _Channel) -> None:
        if channel.sent():
            self._keep(channel)
        else:
            self._draining.append(channel)

    def _keep(self, channel: _Channel) -> None:
        if len(self._free) < _FREE_CHANNELS:
            self._free.append(channel)
        else:
            channel.free()

    def _track(self, sends: list[Any]) -> None:
        # Sends complete on their own (eagerly for small messages); keep them referenced
        # until they do, and reap the finished ones on every call.
        pending = self._sends
        if pending:
            pending = [r for r in pending if not r.Test()]
        pending.extend(sends)
        self._sends = pending

    def _static_header(self, seq: int, header: Any) -> bytes | None:
        """The pickled fingerprint less its seq (which travels in the prefix), cached: within
        one site the rest of a fingerprint repeats call after call. None: pickle it whole."""
        if type(header) is not tuple or not header or header[0] != seq:
            return None
        rest = header[1:]
        try:
            found = self._headers.get(rest)
        except TypeError:  # an unhashable part: nothing to cache
            return pickle.dumps(rest, pickle.HIGHEST_PROTOCOL)
        if found is None:
            found = pickle.dumps(rest, pickle.HIGHEST_PROTOCOL)
            if len(self._headers) < _HEADER_CACHE_MAX:
                self._headers[rest] = found
        return found

    def post(self, seq: int, kind: int, header: tuple[Any, ...], payload: Any,
             same_len: bool = False) -> _MPIExchange:
        return _MPIExchange(self, seq, kind, header, payload, kind == NORMAL, same_len)

    def post_buffer_allgather(self, buffer: Any) -> _MPIBufferExchange:
        return _MPIBufferExchange(self, buffer, None)

    def post_buffer_allreduce(self, buffer: Any, reduce_op: str) -> _MPIBufferExchange:
        return _MPIBufferExchange(self, buffer, reduce_op)

    def block(self, exchange: Any, max_s: float) -> None:
        # Spin, then yield, then sleep in short naps (see _SPIN_S).
        if exchange is not None:
            now = time.monotonic()
            since = exchange.waiting_since
            if not since:
                exchange.waiting_since = since = now
            if now - since < _SPIN_S:
                return
            if now - since < _YIELD_S:
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
        _MPIExchange(self, seq, CLOSED, None, b"", receive=False)
