"""Fault injection around any transport: late completions, failures, operations that never
finish, and lost peers, decided by a seeded generator so a run can be replayed exactly.

Every data operation is really posted on the inner transport and the wrapper reports its
outcome, possibly altered. The alteration never lies about memory: a faulted handle becomes
final only after the inner operation is final, so a ``FAILED`` or ``DONE`` wrapper always
means the buffer is free of transport access, exactly like a real transport. Faults:

- ``DELAY``: the outcome is reported ``delay_polls`` polls and ``delay_s`` seconds (of
  ``clock``) after the inner operation finished. Only ``poll()`` counts polls, so a handle
  delayed by polls never finishes inside ``wait()`` alone; delay by ``delay_s`` for tests
  that drain with ``wait()``.
- ``ERROR``: reported ``FAILED`` (``error == "injected error"``) once the inner operation
  finished, whatever it did (data may have moved, as when a real link fails mid-way).
- ``STUCK``: never reported final, until ``cancel()``; then ``FAILED`` / ``"cancelled"`` as
  soon as the inner operation is final (if the inner one cannot be cancelled and never
  finishes, the handle is stuck for good, as on a wedged link).
- peer loss: after ``lose_peer(peer)`` (or after ``peer_loss_after[peer]`` control messages
  to and from it), control messages to and from that peer are dropped and every operation
  with it behaves as ``STUCK``.

Regions: the wrapper moves regions exactly when ``inner`` does (``moves_regions``), and
faults a region operation like any other, so the engine's zero-copy path meets every fault.
It is one-sided when ``inner`` is, and forwards a receive's ``retract()``.

Determinism: one ``random.Random(seed)`` draws two numbers per posted operation, in post
order, whatever faults are configured; the same seed and the same sequence of calls give the
same faults. ``faults={post_index: Fault}`` forces the fault of chosen operations.
"""

from __future__ import annotations

import collections
import enum
import random
import time
from collections.abc import Callable, Mapping

import torch
from kvhandoff.engine.transports._base import (
    HandleState,
    Transport,
    TransportHandle,
)
from kvhandoff.engine.transports._regions import Regions

__all__ = ["Fault", "FaultyTransport"]


class Fault(enum.Enum):
    """What ``FaultyTransport`` did to one operation."""

    NONE = "none"
    DELAY = "delay"
    ERROR = "error"
    STUCK = "stuck"


class _FaultyHandle(TransportHandle):
    def __init__(self, owner: FaultyTransport, inner: TransportHandle, fault: Fault,
                 index: int) -> None:
        super().__init__(inner.kind, inner.peer, inner.tag, inner.nbytes, owner._finished)
        self._owner = owner
        self.inner = inner
        self.fault = fault
        self.index = index  # post order on this transport, the key of ``faults=``
        self.cancel_requested = False
        self.delayed = False
        inner.token = self

    def _progress(self) -> None:
        self.inner.test()
        self._owner._resolve(self)
        self._owner._release_delayed()

    def cancel(self) -> bool:
        if self.final:
            return False
        if not self.inner.final and not self.inner.cancel():
            return False
        self.cancel_requested = True
        self._owner._resolve(self)
        return True

    def retract(self) -> bool:
        # A one-sided receive: only the peer can end it; the fault still applies after.
        if self.final or not self.inner.retract():
            return False
        self.cancel_requested = True
        self._owner._resolve(self)
        return True


class FaultyTransport(Transport):
    """Wraps ``inner`` and injects faults (see the module docstring). ``error_rate`` and
    ``stuck_rate`` are probabilities per operation (their sum at most 1); of the remaining
    operations a fraction ``delay_rate`` is delayed when ``delay_s`` or ``delay_polls`` is
    set. ``injected`` counts the faults applied so far."""

    def __init__(
        self,
        inner: Transport,
        *,
        seed: int,
        error_rate: float = 0.0,
        stuck_rate: float = 0.0,
        delay_rate: float = 1.0,
        delay_s: float = 0.0,
        delay_polls: int = 0,
        faults: Mapping[int, Fault] | None = None,
        peer_loss_after: Mapping[int, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        for name, rate in (("error_rate", error_rate), ("stuck_rate", stuck_rate),
                           ("delay_rate", delay_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {rate!r}")
        if error_rate + stuck_rate > 1.0:
            raise ValueError(
                f"error_rate + stuck_rate must be at most 1, got {error_rate + stuck_rate}"
            )
        if delay_s < 0 or type(delay_polls) is not int or delay_polls < 0:
            raise ValueError(
                f"delays must be >= 0 (delay_s={delay_s!r}, delay_polls={delay_polls!r})"
            )
        self.inner = inner
        self.rank = inner.rank
        self.world_size = inner.world_size
        self.max_tag = inner.max_tag
        self.cancellable_kinds = inner.cancellable_kinds
        self.moves_regions = inner.moves_regions
        self.region_min_bytes = inner.region_min_bytes
        self.one_sided = inner.one_sided
        self.seed = seed
        self._rng = random.Random(seed)
        self._error_rate = error_rate
        self._stuck_rate = stuck_rate
        self._delay_rate = delay_rate if (delay_s > 0 or delay_polls > 0) else 0.0
        self._delay_s = delay_s
        self._delay_polls = delay_polls
        self._faults = dict(faults or {})
        self._clock = clock
        self._posts = 0
        self._polls = 0
        # Every delay is the same length, so due times are in resolution order: a FIFO.
        self._delayed: collections.deque[tuple[int, float, _FaultyHandle]] = collections.deque()
        self._live: set[_FaultyHandle] = set()
        self._loss_budget = dict(peer_loss_after or {})
        self.lost_peers: set[int] = set()
        self.injected: collections.Counter[Fault] = collections.Counter()

    # -- data operations ---------------------------------------------------------------

    def post_send(self, buf: torch.Tensor, peer: int, tag: int) -> TransportHandle:
        return self._wrap(self.inner.post_send(buf, peer, tag))

    def post_recv(self, buf: torch.Tensor, peer: int, tag: int) -> TransportHandle:
        return self._wrap(self.inner.post_recv(buf, peer, tag))

    def post_send_regions(self, regions: Regions, peer: int, tag: int) -> TransportHandle:
        return self._wrap(self.inner.post_send_regions(regions, peer, tag))

    def post_recv_regions(self, regions: Regions, peer: int, tag: int) -> TransportHandle:
        return self._wrap(self.inner.post_recv_regions(regions, peer, tag))

    def _wrap(self, inner: TransportHandle) -> _FaultyHandle:
        index = self._posts
        self._posts += 1
        fault = self._draw(index)
        self.injected[fault] += 1
        handle = _FaultyHandle(self, inner, fault, index)
        self._live.add(handle)
        self._resolve(handle)  # the inner operation may have completed at post time
        return handle

    def _draw(self, index: int) -> Fault:
        # Always two draws per post, so a forced fault does not shift later ones.
        first, second = self._rng.random(), self._rng.random()
        if index in self._faults:
            return self._faults[index]
        if first < self._error_rate:
            return Fault.ERROR
        if first < self._error_rate + self._stuck_rate:
            return Fault.STUCK
        if second < self._delay_rate:
            return Fault.DELAY
        return Fault.NONE

    def _finished(self, handle: TransportHandle) -> None:
        self._live.discard(handle)  # type: ignore[arg-type]
        self._ready.append(handle)

    def _resolve(self, handle: _FaultyHandle) -> None:
        """Report ``handle`` final if its inner operation is final and its fault allows."""
        inner = handle.inner
        if handle.final or not inner.final:
            return
        if handle.cancel_requested:
            if inner.state is HandleState.DONE and handle.fault is Fault.NONE \
                    and handle.peer not in self.lost_peers:
                handle._finish(HandleState.DONE)
            else:
                handle._finish(HandleState.FAILED, "cancelled")
            return
        if handle.fault is Fault.STUCK or handle.peer in self.lost_peers:
            return
        if handle.fault is Fault.ERROR:
            handle._finish(HandleState.FAILED, "injected error")
            return
        if handle.fault is Fault.DELAY and not handle.delayed:
            handle.delayed = True
            self._delayed.append(
                (self._polls + self._delay_polls, self._clock() + self._delay_s, handle)
            )
            return
        if handle.fault is Fault.DELAY:
            return  # released by _release_delayed when due
        handle._finish(inner.state, inner.error)

    def _release_delayed(self) -> None:
        now = self._clock()
        delayed = self._delayed
        while delayed and delayed[0][0] <= self._polls and delayed[0][1] <= now:
            _, _, handle = delayed.popleft()
            if handle.final or handle.peer in self.lost_peers:
                continue
            handle._finish(handle.inner.state, handle.inner.error)

    def poll(self) -> list[TransportHandle]:
        self._polls += 1
        return super().poll()

    def _advance(self) -> None:
        for inner in self.inner.poll():
            if isinstance(inner.token, _FaultyHandle):
                self._resolve(inner.token)
        self._release_delayed()

    # -- peers and control -------------------------------------------------------------

    def lose_peer(self, peer: int) -> None:
        """From now on ``peer`` is silent: its control messages are dropped both ways and
        operations with it never complete (until cancelled)."""
        self.lost_peers.add(peer)

    def _count_control(self, peer: int) -> None:
        budget = self._loss_budget.get(peer)
        if budget is None:
            return
        if budget <= 0:
            self.lose_peer(peer)
            del self._loss_budget[peer]
        else:
            self._loss_budget[peer] = budget - 1

    def send_control(self, peer: int, payload: bytes) -> None:
        self._count_control(peer)
        if peer in self.lost_peers:
            # Same argument checks as a real send, then silence.
            self._check_open("send_control")
            self._check_payload(payload)
            return
        self.inner.send_control(peer, payload)

    def recv_control(self) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        for source, payload in self.inner.recv_control():
            self._count_control(source)
            if source not in self.lost_peers:
                out.append((source, payload))
        return out

    def close(self) -> None:
        """Close the inner transport and cancel every wrapper that can be cancelled."""
        if not self._begin_close():
            return
        for handle in list(self._live):
            handle.cancel()
        self.inner.close()
        self._advance()
