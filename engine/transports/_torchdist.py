"""torch.distributed transport: ``isend``/``irecv`` with tags, completion via ``Work``.

Two facts about torch.distributed shape this module:

- gloo's point-to-point ``Work`` only records completion inside ``wait()``:
  ``is_completed()`` stays ``False`` forever if nobody waits (checked on torch 2.13), and it
  has no future to attach a callback to. So on gloo each posted operation gets a daemon
  thread that sits in ``wait()`` (which releases the GIL) and queues the outcome; ``poll()``
  drains that queue, so its cost grows with completions, and the event loop never waits.
  Backends whose ``Work.is_completed()`` works (NCCL) are polled directly, no threads.
- NCCL ignores tags: operations between a pair match in the order they were posted, so an
  engine on NCCL must post data operations to a peer in the same order on both sides.
  Control messages always travel on a gloo group (made for it when the data group is not
  gloo), where tags are honoured.

Control messages are fixed-size ``uint8`` frames, ``[u32 length][payload][zero padding]``,
with one receive always posted per peer, so no size negotiation is needed. ``close()`` sends
each peer a goodbye frame that completes the receive the peer keeps posted for this rank,
then waits (bounded) for every peer's goodbye, discarding whatever the peer sent before it:
a gloo operation still waiting in a thread when the process exits aborts the process
("terminate called without an active exception"), and a peer's last messages would
otherwise leave its goodbye unmatched.

Nothing in torch.distributed cancels a posted point-to-point operation:
``cancellable_kinds`` is empty and ``cancel()`` always returns ``False``.
"""

from __future__ import annotations

import queue
import struct
import threading
import time
from typing import Any

import torch
from kvhandoff.engine.transports._base import (
    CONTROL_TAG,
    MAX_CONTROL_BYTES,
    HandleKind,
    HandleState,
    Transport,
    TransportHandle,
)
from kvhandoff.engine.transports.errors import InvalidBufferError, TransportUnavailableError

__all__ = ["TorchDistTransport"]

_LENGTH = struct.Struct("!I")
FRAME_BYTES = _LENGTH.size + MAX_CONTROL_BYTES
# A frame with this length says "this rank closed its transport": the receiver stops
# posting control receives for it, so no receive stays pending into process exit.
_GOODBYE = 0xFFFFFFFF
# After a control receive fails (an idle timeout, a peer gone), repost it at most this often.
_CONTROL_RETRY_S = 1.0
#: How long ``close()`` waits for the peers' goodbyes and for its own goodbyes to be taken.
CLOSE_TIMEOUT_S = 10.0


def _wait_outcome(work: Any) -> str | None:
    """Block in ``work.wait()``; the failure text, or ``None`` on success."""
    try:
        work.wait()
    except Exception as exc:  # any backend failure ends the operation: report it, not raise
        return f"{type(exc).__name__}: {exc}"
    return None


class _TorchHandle(TransportHandle):
    def __init__(self, owner: TorchDistTransport, kind: HandleKind, peer: int, tag: int,
                 data: torch.Tensor, work: Any) -> None:
        super().__init__(kind, peer, tag, data.numel(), owner._ready.append)
        self._owner = owner
        self._buffer = data  # the backend uses it until final
        self.work = work

    def _progress(self) -> None:
        self._owner._advance()

    def cancel(self) -> bool:
        return False


class TorchDistTransport(Transport):
    """Point-to-point over torch.distributed (gloo on CPU, NCCL on GPU).

    ``group=None`` creates a new group over the whole world (``new_group`` is collective:
    every rank must construct its transport), so the transport's tags never collide with
    the host's own sends. A given ``group`` is used as is: give the transport one of its
    own. ``peer`` and ``rank`` are ranks within the group. With a non-gloo data group and no
    ``control_group``, a gloo group over the same ranks is created (collective again).
    """

    cancellable_kinds: frozenset[HandleKind] = frozenset()

    def __init__(self, group: Any = None, *, control_group: Any = None) -> None:
        super().__init__()
        try:
            import torch.distributed as dist
        except ImportError as exc:  # pragma: no cover - torch builds without distributed
            raise TransportUnavailableError("torch.distributed", str(exc)) from None
        if not dist.is_available() or not dist.is_initialized():
            raise TransportUnavailableError(
                "torch.distributed",
                "call torch.distributed.init_process_group() on every rank before creating "
                "the transport",
            )
        self._dist = dist
        self._group = dist.new_group() if group is None else group
        self.backend = str(dist.get_backend(self._group))
        self._global_ranks: list[int] = list(dist.get_process_group_ranks(self._group))
        if control_group is None:
            control_group = (
                self._group if self.backend == "gloo"
                else dist.new_group(ranks=self._global_ranks, backend="gloo")
            )
        self._control_group = control_group
        self.rank = dist.get_rank(self._group)
        self.world_size = dist.get_world_size(self._group)
        # gloo's p2p Work never reports completion without wait(): see the module docstring.
        self._threaded = self.backend == "gloo"
        self._device_type = {"gloo": "cpu", "nccl": "cuda"}.get(self.backend)
        self._completions: queue.SimpleQueue[tuple[_TorchHandle, str | None]] = (
            queue.SimpleQueue()
        )
        self._polled: list[_TorchHandle] = []  # pending handles of non-threaded backends
        self._control_arrivals: queue.SimpleQueue[tuple[int, str | None]] = queue.SimpleQueue()
        self._control_frames: dict[int, torch.Tensor] = {}
        self._control_retry_at: dict[int, float] = {}
        self._departed: set[int] = set()  # peers that sent a goodbye frame
        self._control_sends: list[threading.Thread] = []  # pruned as they finish
        self._control_recvs: dict[int, threading.Thread] = {}  # the latest receive per peer
        for peer in range(self.world_size):
            if peer != self.rank:
                self._post_control_recv(peer)

    def post_send(self, buf: torch.Tensor, peer: int, tag: int) -> TransportHandle:
        return self._post(HandleKind.SEND, buf, peer, tag)

    def post_recv(self, buf: torch.Tensor, peer: int, tag: int) -> TransportHandle:
        return self._post(HandleKind.RECV, buf, peer, tag)

    def _post(self, kind: HandleKind, buf: torch.Tensor, peer: int, tag: int) -> TransportHandle:
        peer, tag, data = self._check_post(kind, buf, peer, tag)
        if self._device_type is not None and data.device.type != self._device_type:
            raise InvalidBufferError(
                f"the {self.backend} backend moves {self._device_type} tensors, got a "
                f"{data.device} buffer: allocate the pool on {self._device_type}",
                device=str(data.device),
            )
        target = self._global_ranks[peer]
        if kind is HandleKind.SEND:
            work = self._dist.isend(data, dst=target, group=self._group, tag=tag)
        else:
            work = self._dist.irecv(data, src=target, group=self._group, tag=tag)
        handle = _TorchHandle(self, kind, peer, tag, data, work)
        if self._threaded:
            threading.Thread(
                target=self._wait_data, args=(handle, work), name="kvhandoff-gloo-wait",
                daemon=True,
            ).start()
        else:
            self._polled.append(handle)
        return handle

    def _wait_data(self, handle: _TorchHandle, work: Any) -> None:
        self._completions.put((handle, _wait_outcome(work)))

    def _advance(self) -> None:
        completions = self._completions
        while True:
            try:
                handle, error = completions.get_nowait()
            except queue.Empty:
                break
            if error is None:
                handle._finish(HandleState.DONE)
            else:
                handle._finish(HandleState.FAILED, error)
        if self._polled:
            still: list[_TorchHandle] = []
            for handle in self._polled:
                if handle.work.is_completed():
                    # Already complete, so wait() returns at once and raises on failure.
                    error = _wait_outcome(handle.work)
                    handle._finish(HandleState.DONE if error is None else HandleState.FAILED,
                                   error)
                else:
                    still.append(handle)
            self._polled = still

    # -- control channel ---------------------------------------------------------------

    def _post_control_recv(self, peer: int) -> None:
        frame = torch.zeros(FRAME_BYTES, dtype=torch.uint8)
        work = self._dist.irecv(frame, src=self._global_ranks[peer], group=self._control_group,
                                tag=CONTROL_TAG)
        self._control_frames[peer] = frame
        thread = threading.Thread(
            target=self._wait_control, args=(peer, work),
            name=f"kvhandoff-gloo-control-recv-{peer}", daemon=True,
        )
        thread.start()
        self._control_recvs[peer] = thread

    def _wait_control(self, peer: int, work: Any) -> None:
        self._control_arrivals.put((peer, _wait_outcome(work)))

    def send_control(self, peer: int, payload: bytes) -> None:
        self._check_open("send_control")
        data = self._check_payload(payload)
        peer = self._check_peer(peer)
        if peer not in self._departed:  # a departed peer no longer receives
            self._send_frame(peer, len(data), data)

    def _send_frame(self, peer: int, length: int, data: bytes) -> None:
        frame = torch.zeros(FRAME_BYTES, dtype=torch.uint8)
        frame[: _LENGTH.size] = torch.frombuffer(bytearray(_LENGTH.pack(length)),
                                                 dtype=torch.uint8)
        if data:
            frame[_LENGTH.size: _LENGTH.size + len(data)] = torch.frombuffer(
                bytearray(data), dtype=torch.uint8
            )
        self._control_sends = [t for t in self._control_sends if t.is_alive()]
        work = self._dist.isend(frame, dst=self._global_ranks[peer], group=self._control_group,
                                tag=CONTROL_TAG)
        # The thread keeps the frame referenced until gloo is done with it; a failed control
        # send is not reported: lost control messages surface as a lapsed peer lease.
        thread = threading.Thread(target=_wait_outcome, args=(work,),
                                  name=f"kvhandoff-gloo-control-send-{peer}", daemon=True)
        thread.start()
        self._control_sends.append(thread)

    def recv_control(self) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        now = time.monotonic()
        while True:
            try:
                peer, error = self._control_arrivals.get_nowait()
            except queue.Empty:
                break
            if error is None:
                frame = self._control_frames[peer]
                (length,) = _LENGTH.unpack(frame[: _LENGTH.size].numpy().tobytes())
                if length == _GOODBYE:
                    self._departed.add(peer)
                    continue
                # A corrupt length is clamped, not trusted; the wire decoder rejects the rest.
                length = min(length, MAX_CONTROL_BYTES)
                out.append((peer, frame[_LENGTH.size: _LENGTH.size + length].numpy().tobytes()))
                if not self._closed:
                    self._post_control_recv(peer)
            else:
                self._control_retry_at[peer] = now + _CONTROL_RETRY_S
        for peer, when in list(self._control_retry_at.items()):
            if when <= now:
                del self._control_retry_at[peer]
                if not self._closed and peer not in self._departed:
                    self._post_control_recv(peer)
        return out

    def close(self) -> None:
        """Refuse new operations and say goodbye to every peer, also one that closed first
        (the goodbye completes the control receive each peer keeps posted for this rank).
        Posted data operations cannot be cancelled in torch.distributed: they stay pending
        until their peers match them. This
        rank's own control receives complete when each peer closes: ``close()`` waits for
        that, at most ``CLOSE_TIMEOUT_S`` (a peer that never closes costs the whole bound),
        discarding the control messages that arrive meanwhile. Close every rank's transport
        before destroying the process groups."""
        if not self._begin_close():
            return
        # Every peer, departed or not, keeps one control receive posted for this rank until
        # our goodbye arrives: skipping a peer that closed first would leave its last receive
        # pending into its process exit.
        for peer in range(self.world_size):
            if peer != self.rank:
                self._send_frame(peer, _GOODBYE, b"")
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        waiting = set(range(self.world_size)) - {self.rank} - self._departed
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                peer, error = self._control_arrivals.get(timeout=left)
            except queue.Empty:
                break
            if error is not None:
                continue  # that receive ended without a frame: the peer is gone or timed out
            frame = self._control_frames[peer]
            (length,) = _LENGTH.unpack(frame[: _LENGTH.size].numpy().tobytes())
            if length == _GOODBYE:
                self._departed.add(peer)
                waiting.discard(peer)
            else:  # a last message from a peer still running: drop it, wait for its goodbye
                self._post_control_recv(peer)
        # Our goodbyes (taken by the peers' receives) and the receives that got theirs: no
        # thread may still be inside gloo when the process exits.
        for thread in [*self._control_sends, *self._control_recvs.values()]:
            thread.join(max(0.0, deadline - time.monotonic()))
