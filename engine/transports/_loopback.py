"""In-process transport: endpoints for ranks 0..n-1 that share one matching table.

A send and the receive it matches (same source, destination and tag, first posted first
matched) complete together the moment the second of the two is posted: the bytes are copied
inside that ``post_*`` call, so nothing ever waits and no thread is needed. The embedded
demo runs several ranks' engines in one event loop over these endpoints. A lock makes the
shared table safe when endpoints are driven from different threads too.

Region form (``moves_regions``): either side may post ``Regions`` instead of a buffer. A
region send matched with a region receive copies the sender's blocks straight into the
receiver's in one pass (``kvhandoff.cuda_ext.copy_regions``: a merge of the two region lists,
one parallel loop on the CPU, one kernel on a GPU), with no staging buffer on either side. A
buffer is one region, so a region send and a buffer receive (or the other way round) move
the same byte stream through the same call; two buffers keep their plain ``copy_``.
"""

from __future__ import annotations

import collections
import threading
from typing import cast

import torch
from kvhandoff import cuda_ext
from kvhandoff.engine.transports._base import (
    HandleKind,
    HandleState,
    Transport,
    TransportHandle,
)
from kvhandoff.engine.transports._regions import Regions, buffer_regions
from kvhandoff.engine.transports.errors import InvalidBufferError

__all__ = ["LoopbackTransport", "loopback_group"]

_Key = tuple[int, int, int]  # (source rank, destination rank, tag)


class _LoopbackHandle(TransportHandle):
    def __init__(self, owner: LoopbackTransport, kind: HandleKind, peer: int, tag: int,
                 data: torch.Tensor | Regions) -> None:
        nbytes = data.nbytes if isinstance(data, Regions) else data.numel()
        super().__init__(kind, peer, tag, nbytes, owner._ready.append)
        self._owner = owner
        self._buffer = data
        src, dst = (owner.rank, peer) if kind is HandleKind.SEND else (peer, owner.rank)
        self.key: _Key = (src, dst, tag)
        # Set under the hub lock when matched: from then on the copy runs and cancel is moot.
        self.matched = False

    def _progress(self) -> None:
        # Matching happens at post time; there is nothing to observe later.
        return

    def cancel(self) -> bool:
        return self._owner._hub.cancel(self, "cancelled")


class _Hub:
    """The matching table shared by a loopback group."""

    def __init__(self, world_size: int) -> None:
        self.lock = threading.Lock()
        self.endpoints: list[LoopbackTransport] = []
        self.sends: dict[_Key, collections.deque[_LoopbackHandle]] = {}
        self.recvs: dict[_Key, collections.deque[_LoopbackHandle]] = {}
        self.world_size = world_size

    def post(self, handle: _LoopbackHandle) -> None:
        with self.lock:
            dst_open = not self.endpoints[handle.key[1]].closed
            src_open = not self.endpoints[handle.key[0]].closed
            if not (dst_open and src_open):
                handle._finish(HandleState.FAILED, f"peer {handle.peer} closed")
                return
            mine, theirs = (
                (self.sends, self.recvs) if handle.kind is HandleKind.SEND
                else (self.recvs, self.sends)
            )
            waiting = theirs.get(handle.key)
            if not waiting:
                mine.setdefault(handle.key, collections.deque()).append(handle)
                return
            other = waiting.popleft()
            other.matched = handle.matched = True
            if not waiting:
                del theirs[handle.key]
        send, recv = (handle, other) if handle.kind is HandleKind.SEND else (other, handle)
        self._move(send, recv)

    @staticmethod
    def _move(send: _LoopbackHandle, recv: _LoopbackHandle) -> None:
        if send.nbytes != recv.nbytes:
            # Neither buffer is touched: a size mismatch is a protocol error, not a copy.
            reason = f"size mismatch: sender has {send.nbytes} bytes, receiver {recv.nbytes}"
            send._finish(HandleState.FAILED, reason)
            recv._finish(HandleState.FAILED, reason)
            return
        # Both are still pending here, so both still hold their byte views or regions.
        source = cast(torch.Tensor | Regions, send._buffer)
        target = cast(torch.Tensor | Regions, recv._buffer)
        try:
            if isinstance(source, torch.Tensor) and isinstance(target, torch.Tensor):
                target.copy_(source)
            else:
                cuda_ext.copy_regions(_as_regions(source), _as_regions(target))
        except cuda_ext.BlockCopyError as exc:
            # Raised before any byte moved (e.g. the two sides overlap): like a size
            # mismatch, both operations fail and neither side's memory is written.
            reason = f"region copy refused: {exc}"
        except Exception as exc:  # a failed copy (a kernel launch...) still ends both ops
            reason = f"copy failed: {exc!r}"
        else:
            send._finish(HandleState.DONE)
            recv._finish(HandleState.DONE)
            return
        # Matched handles cannot be cancelled: a failure must make them final here, or
        # their owners would wait for them forever.
        send._finish(HandleState.FAILED, reason)
        recv._finish(HandleState.FAILED, reason)

    def cancel(self, handle: _LoopbackHandle, reason: str) -> bool:
        with self.lock:
            if handle.final or handle.matched:
                return False
            table = self.sends if handle.kind is HandleKind.SEND else self.recvs
            queue = table[handle.key]
            queue.remove(handle)
            if not queue:
                del table[handle.key]
        handle._finish(HandleState.FAILED, reason)
        return True

    def close(self, rank: int) -> None:
        """Fail every unmatched operation to or from ``rank``: none can ever match now."""
        failed: list[tuple[_LoopbackHandle, str]] = []
        with self.lock:
            for table in (self.sends, self.recvs):
                for key in [k for k in table if rank in (k[0], k[1])]:
                    for handle in table.pop(key):
                        own = handle._owner.rank == rank
                        reason = "transport closed" if own else f"peer {rank} closed"
                        failed.append((handle, reason))
        for handle, reason in failed:
            handle._finish(HandleState.FAILED, reason)


def _as_regions(data: torch.Tensor | Regions) -> Regions:
    """``data`` as regions: a (flat byte view) buffer is one region over its bytes."""
    return data if isinstance(data, Regions) else buffer_regions(data)


class LoopbackTransport(Transport):
    """One rank's endpoint of an in-process group; make them with ``loopback_group(n)`` or
    ``LoopbackTransport.pair()``. Posted operations of either kind can be cancelled while
    unmatched. Sizes must match exactly: a send and receive of different sizes both fail
    with a ``size mismatch`` error and neither buffer is written. Moves regions
    (``post_send_regions`` / ``post_recv_regions``) block to block in one pass."""

    cancellable_kinds = frozenset(HandleKind)
    moves_regions = True
    # Describing and checking a region list costs ~0.1 ms per operation in Python, a gather
    # plus a scatter of small blocks ~15 us: below ~8 KiB per region (e.g. one block of a
    # tiny test model) the staged path is faster, above it the one-pass copy wins.
    region_min_bytes = 8 << 10

    def __init__(self, hub: _Hub, rank: int) -> None:
        super().__init__()
        self._hub = hub
        self.rank = rank
        self.world_size = hub.world_size
        self._inbox: collections.deque[tuple[int, bytes]] = collections.deque()

    @classmethod
    def pair(cls) -> tuple[LoopbackTransport, LoopbackTransport]:
        """Endpoints for ranks 0 and 1."""
        first, second = loopback_group(2)
        return first, second

    def post_send(self, buf: torch.Tensor, peer: int, tag: int) -> TransportHandle:
        return self._post(HandleKind.SEND, buf, peer, tag)

    def post_recv(self, buf: torch.Tensor, peer: int, tag: int) -> TransportHandle:
        return self._post(HandleKind.RECV, buf, peer, tag)

    def post_send_regions(self, regions: Regions, peer: int, tag: int) -> TransportHandle:
        return self._post_regions(HandleKind.SEND, regions, peer, tag)

    def post_recv_regions(self, regions: Regions, peer: int, tag: int) -> TransportHandle:
        return self._post_regions(HandleKind.RECV, regions, peer, tag)

    def _post(self, kind: HandleKind, buf: torch.Tensor, peer: int, tag: int) -> TransportHandle:
        handle = _LoopbackHandle(self, kind, *self._check_post(kind, buf, peer, tag))
        self._hub.post(handle)
        return handle

    def _post_regions(self, kind: HandleKind, regions: object, peer: int,
                      tag: int) -> TransportHandle:
        self._check_open(f"post_{kind.value}_regions")
        checked_peer, checked_tag = self._check_peer(peer), self._check_tag(tag)
        if not isinstance(regions, Regions):
            raise InvalidBufferError(
                f"regions must be a Regions (see block_regions), not {type(regions).__name__}")
        if regions.nbytes <= 0:
            raise InvalidBufferError("the regions are empty: there is nothing to move",
                                     device=str(regions.device))
        handle = _LoopbackHandle(self, kind, checked_peer, checked_tag, regions)
        self._hub.post(handle)
        return handle

    def _advance(self) -> None:
        # Completions are queued by the post that matched them.
        return

    def send_control(self, peer: int, payload: bytes) -> None:
        self._check_open("send_control")
        data = self._check_payload(payload)
        target = self._hub.endpoints[self._check_peer(peer)]
        if not target.closed:  # a closed rank drops its mail, like a process that exited
            target._inbox.append((self.rank, data))

    def recv_control(self) -> list[tuple[int, bytes]]:
        inbox = self._inbox
        out: list[tuple[int, bytes]] = []
        while inbox:
            out.append(inbox.popleft())
        return out

    def close(self) -> None:
        if not self._begin_close():
            return
        self._inbox.clear()
        self._hub.close(self.rank)


def loopback_group(n: int) -> list[LoopbackTransport]:
    """Connected in-process endpoints for ranks ``0..n-1`` (``n >= 2``)."""
    if type(n) is not int or n < 2:
        raise ValueError(f"a loopback group needs at least 2 ranks, got {n!r}")
    hub = _Hub(n)
    hub.endpoints = [LoopbackTransport(hub, rank) for rank in range(n)]
    return list(hub.endpoints)
