"""The transport interface: post a send or receive of a buffer to a peer, get a handle.

Theory of operation. A transport moves the bytes of a contiguous tensor between two ranks.
``post_send`` / ``post_recv`` return at once with a ``TransportHandle``; from then on the
transport may read (send) or write (receive) the buffer until the handle reaches a final
state, ``DONE`` or ``FAILED``. A final state is a promise: the transport will never touch
that buffer again, so its memory may be reused. Nothing but a final state makes that promise;
a timeout, a cancel request or a lost peer does not.

Completion is observed without blocking: ``handle.test()`` and ``transport.poll()`` never
wait. ``poll()`` returns each handle exactly once, in the poll after it reached a final state
(however that was first observed, by ``test()`` or by ``poll()``), so an engine can drive
every transfer from one poll loop whose cost grows with the number of completions.
``wait()`` is the only blocking call and exists for shutdown drain.

Tags: data tags are chosen by the receiver and carried in its advertise message; they are
``1..transport.max_tag``. Tag 0 is the control channel's and never a data tag. Between one
pair of ranks, operations with the same tag match in the order they were posted.

Region form: a transport whose ``moves_regions`` is true also moves a message made of byte
ranges of memory the caller owns (``Regions``, see ``_regions``) with ``post_send_regions`` /
``post_recv_regions``: the blocks move where they are, with no staging buffer in between.
The byte stream is the same as a buffer holding the regions back to back, so a region send
matches a buffer receive of the same bytes and the other way round. The promise of a final
state covers the regions' memory exactly as it covers a buffer: until then the transport may
read or write it, so the engine keeps those blocks pinned.

Control channel: ``send_control(peer, payload)`` queues a small message (at most
``MAX_CONTROL_BYTES``) without blocking; ``recv_control()`` returns every control message that
has arrived, as ``(source rank, bytes)``. The payload is opaque here; ``kvhandoff.engine._wire``
gives it meaning.
"""

from __future__ import annotations

import abc
import collections
import enum
import time
from collections.abc import Callable

import torch
from kvhandoff.engine.transports._regions import Regions
from kvhandoff.engine.transports.errors import (
    ControlMessageTooLargeError,
    InvalidBufferError,
    InvalidTagError,
    PeerUnknownError,
    RegionsUnsupportedError,
    TransportClosedError,
)

__all__ = [
    "CONTROL_TAG",
    "MAX_CONTROL_BYTES",
    "HandleKind",
    "HandleState",
    "Transport",
    "TransportHandle",
]

CONTROL_TAG = 0
MAX_CONTROL_BYTES = 4096
# The largest data tag any transport offers; MPI may offer less (its TAG_UB, >= 32767).
MAX_TAG = 2**31 - 1


class HandleState(enum.Enum):
    """Where a posted operation is. ``DONE`` and ``FAILED`` are final: the transport no
    longer touches the buffer."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class HandleKind(enum.Enum):
    SEND = "send"
    RECV = "recv"


class TransportHandle(abc.ABC):
    """One posted send or receive.

    ``kind``, ``peer``, ``tag`` and ``nbytes`` describe the operation; ``token`` is free for
    the caller (the engine maps a completion back to its session through it); ``error`` is
    the reason once the state is ``FAILED`` (``"cancelled"`` after a successful cancel).
    """

    def __init__(
        self,
        kind: HandleKind,
        peer: int,
        tag: int,
        nbytes: int,
        on_final: Callable[[TransportHandle], None],
    ) -> None:
        self.kind = kind
        self.peer = peer
        self.tag = tag
        self.nbytes = nbytes
        self.token: object = None
        self._state = HandleState.PENDING
        self._error: str | None = None
        self._on_final = on_final
        # The buffer the transport may touch; referenced until final so it stays alive.
        self._buffer: object = None

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.kind.value} peer={self.peer} tag={self.tag} "
            f"nbytes={self.nbytes} {self._state.value}"
            + (f" error={self._error!r}>" if self._error else ">")
        )

    @property
    def state(self) -> HandleState:
        """The last observed state, without trying to make progress."""
        return self._state

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def final(self) -> bool:
        return self._state is not HandleState.PENDING

    def test(self) -> HandleState:
        """The state now; never blocks. A handle that becomes final here is still returned
        by the transport's next ``poll()``."""
        if self._state is HandleState.PENDING:
            self._progress()
        return self._state

    def wait(self, timeout: float | None = None) -> HandleState:
        """Block until the handle is final or ``timeout`` seconds passed; returns the state
        (``PENDING`` on timeout). For shutdown drain only: an event loop must use
        ``test()``/``poll()``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 1e-5
        while self.test() is HandleState.PENDING:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                pause = min(pause, remaining)
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
        return self._state

    @abc.abstractmethod
    def cancel(self) -> bool:
        """Ask the transport to stop this operation; best effort, never blocks. ``True``
        means the handle will reach a final state without waiting for its peer: ``FAILED``
        with ``error == "cancelled"`` or, if the data had already moved, ``DONE``; until then
        the buffer stays in use. ``False`` means nothing changed: the handle is already
        final, or the transport cannot cancel this operation (see
        ``Transport.cancellable_kinds``) and it stays pending until its peer matches it."""

    def retract(self) -> bool:
        """A one-sided receive (``Transport.one_sided``): ask the peer to give up this
        receive's memory, which it may otherwise write at any time. ``True`` if asked: the
        handle becomes ``FAILED`` "cancelled" once the peer confirms it never wrote (``DONE``
        if the write had happened), and the memory stays in use until then. ``False``
        (nothing changed) on a transport that is not one-sided, a send, a final handle, or
        one already retracted. A one-sided receive's ``cancel()`` is always ``False``: only
        the peer can say its writes are over."""
        return False

    @abc.abstractmethod
    def _progress(self) -> None:
        """Observe completion without blocking (calls ``_finish`` when final)."""

    def _finish(self, state: HandleState, error: str | None = None) -> None:
        if self._state is not HandleState.PENDING:
            return
        self._state = state
        self._error = error
        self._buffer = None
        self._on_final(self)


class Transport(abc.ABC):
    """A point-to-point byte mover between the ``world_size`` ranks of one group.

    Attributes a caller may rely on: ``rank``, ``world_size``, ``max_tag`` (the largest
    data tag), ``cancellable_kinds`` (which posted operations ``cancel()`` can stop) and
    ``cancellable`` (every posted operation can be cancelled). Not thread-safe unless a
    subclass says so: drive one transport from one thread.
    """

    rank: int
    world_size: int
    max_tag: int = MAX_TAG
    cancellable_kinds: frozenset[HandleKind] = frozenset()
    #: True when ``post_send_regions`` / ``post_recv_regions`` move regions natively.
    moves_regions: bool = False
    #: True when a receive makes its memory writable by the peer with no further operation
    #: of its own (NIXL): its handle is final only when the peer says it is done with it.
    one_sided: bool = False
    #: A hint for the engine (``EngineConfig.region_min_bytes`` overrides it): regions that
    #: average fewer bytes than this move faster through a staging buffer on this transport.
    region_min_bytes: int = 0

    def __init__(self) -> None:
        self._ready: collections.deque[TransportHandle] = collections.deque()
        self._closed: bool = False

    @property
    def cancellable(self) -> bool:
        return self.cancellable_kinds == frozenset(HandleKind)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @abc.abstractmethod
    def post_send(self, buf: torch.Tensor, peer: int, tag: int) -> TransportHandle:
        """Start sending the bytes of ``buf`` (a contiguous tensor) to ``peer`` on data
        ``tag``. The buffer must not be modified until the handle is final."""

    @abc.abstractmethod
    def post_recv(self, buf: torch.Tensor, peer: int, tag: int) -> TransportHandle:
        """Start receiving exactly ``buf``'s byte size from ``peer`` on data ``tag``. A
        message of another size fails the handle."""

    def post_send_regions(self, regions: Regions, peer: int, tag: int) -> TransportHandle:
        """Start sending the bytes of ``regions``, in order, to ``peer`` on data ``tag``;
        the regions' memory must not be modified until the handle is final. Only when
        ``moves_regions``; otherwise ``RegionsUnsupportedError``."""
        raise RegionsUnsupportedError(type(self).__name__)

    def post_recv_regions(self, regions: Regions, peer: int, tag: int) -> TransportHandle:
        """Start receiving exactly ``regions.nbytes`` from ``peer`` on data ``tag`` into the
        regions, in order. Only when ``moves_regions``; otherwise
        ``RegionsUnsupportedError``."""
        raise RegionsUnsupportedError(type(self).__name__)

    def poll(self) -> list[TransportHandle]:
        """Handles that reached a final state since the last poll, each exactly once.
        Never blocks; also works after ``close()`` so a drain can collect the last ones."""
        self._advance()
        ready = self._ready
        out: list[TransportHandle] = []
        while ready:
            out.append(ready.popleft())
        return out

    @abc.abstractmethod
    def send_control(self, peer: int, payload: bytes) -> None:
        """Queue a control message to ``peer``; never blocks. Messages to one peer arrive in
        order."""

    @abc.abstractmethod
    def recv_control(self) -> list[tuple[int, bytes]]:
        """Every control message that has arrived, as ``(source rank, payload)``, in
        arrival order per source; never blocks."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop accepting new operations (they raise ``TransportClosedError``) and cancel
        what can be cancelled. Idempotent. Operations that cannot be cancelled stay pending,
        and their buffers in use, until they finish."""

    @abc.abstractmethod
    def _advance(self) -> None:
        """Observe completions without blocking; final handles go to ``self._ready``."""

    def _begin_close(self) -> bool:
        """Mark the transport closed; ``False`` if it already was (close is idempotent)."""
        if self._closed:
            return False
        self._closed = True
        return True

    # -- argument checks shared by every transport ------------------------------------

    def _check_open(self, operation: str) -> None:
        if self._closed:
            raise TransportClosedError(operation)

    def _check_peer(self, peer: object) -> int:
        if type(peer) is not int or not 0 <= peer < self.world_size or peer == self.rank:
            raise PeerUnknownError(peer, self.rank, self.world_size)
        return peer

    def _check_tag(self, tag: object) -> int:
        if type(tag) is not int or not 1 <= tag <= self.max_tag:
            raise InvalidTagError(tag, self.max_tag)
        return tag

    def _check_post(self, kind: HandleKind, buf: object, peer: object,
                    tag: object) -> tuple[int, int, torch.Tensor]:
        """The checks every ``post_send`` / ``post_recv`` starts with: open, a known peer, a
        data tag in range, a contiguous tensor. Returns ``(peer, tag, byte view)``."""
        self._check_open(f"post_{kind.value}")
        return self._check_peer(peer), self._check_tag(tag), as_byte_view(buf)

    def _check_payload(self, payload: object) -> bytes:
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError(f"control payload must be bytes, not {type(payload).__name__}")
        data = bytes(payload)
        if len(data) > MAX_CONTROL_BYTES:
            raise ControlMessageTooLargeError(len(data), MAX_CONTROL_BYTES)
        return data


class WrappingTransport(Transport):
    """Base of a transport that wraps ``inner`` to change what its data operations do (hold
    them, defer them, record them): it takes ``inner``'s rank, world size, tag space and (by
    default) cancellable kinds, forwards control messages and ``close``, and each ``poll``
    polls ``inner`` then progresses the wrapper handles registered with ``_track``.
    Subclasses implement ``post_send`` / ``post_recv``; a wrapper handle's ``_progress``
    reads its inner handle and finishes itself."""

    def __init__(self, inner: Transport,
                 cancellable_kinds: frozenset[HandleKind] | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.rank = inner.rank
        self.world_size = inner.world_size
        self.max_tag = inner.max_tag
        self.cancellable_kinds = (inner.cancellable_kinds if cancellable_kinds is None
                                  else cancellable_kinds)
        self._live: list[TransportHandle] = []

    def _track(self, handle: TransportHandle) -> TransportHandle:
        self._live.append(handle)
        return handle

    def _advance(self) -> None:
        self.inner.poll()
        still = []
        for handle in self._live:
            handle._progress()
            if not handle.final:
                still.append(handle)
        self._live = still

    def send_control(self, peer: int, payload: bytes) -> None:
        self.inner.send_control(peer, payload)

    def recv_control(self) -> list[tuple[int, bytes]]:
        return self.inner.recv_control()

    def close(self) -> None:
        if self._begin_close():
            self.inner.close()


def as_byte_view(buf: object) -> torch.Tensor:
    """A flat ``uint8`` view of ``buf`` sharing its memory (no copy). Raises
    ``InvalidBufferError`` for anything that is not a non-empty contiguous tensor."""
    if not isinstance(buf, torch.Tensor):
        raise InvalidBufferError(f"buffer must be a torch.Tensor, not {type(buf).__name__}")
    if buf.dtype is torch.uint8 and buf.dim() == 1 and buf.is_contiguous() and buf.numel():
        return buf  # already one (a staging buffer): a new view would cost more than the rest
    if not buf.is_contiguous():
        raise InvalidBufferError(
            "buffer must be contiguous: gather the blocks into one buffer first "
            "(kvhandoff.cuda_ext.gather) or call .contiguous()",
            device=str(buf.device),
        )
    if buf.numel() == 0:
        raise InvalidBufferError("buffer is empty: there is nothing to move",
                                 device=str(buf.device))
    return buf.reshape(-1).view(torch.uint8)
