"""``Leases``: which peers we have transfers open with, when each was last heard, heartbeats.

A peer with open transfers that sends nothing for longer than ``lease_s`` is declared lost
and its open transfers fail with ``peer_lost``. Any control message renews a peer's lease;
heartbeats (every ``heartbeat_every_s``) keep an idle but healthy peer's lease alive. The
lease on a peer starts, at the latest, when a transfer with it opens. Sans-I/O: the engine
passes the time in and sends the heartbeats this object asks for.

A transport that can tell a peer is gone sooner (``NixlTransport.peer_lost``: its probes, a
failed post or notification) is asked too, through ``lapsed``'s ``probe``: a peer it reports
lost fails its open transfers at once, without waiting out the lease. The lease still covers
everything the probe cannot see (a peer alive to the transport whose engine has stopped).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator

__all__ = ["Leases"]


class Leases:
    """Peer leases of one engine."""

    def __init__(self, lease_s: float, heartbeat_every_s: float, now: float) -> None:
        self.lease_s = lease_s
        self.heartbeat_every_s = heartbeat_every_s
        self._last_heard: dict[int, float] = {}
        self._open_by_peer: dict[int, set[str]] = {}
        self._sequence = itertools.count()
        self._next_heartbeat = now

    def heard(self, peer: int, now: float) -> None:
        """Any message from ``peer`` renews its lease."""
        self._last_heard[peer] = now

    def engaged(self, peer: int, now: float) -> None:
        """A transfer with ``peer`` opened: its lease runs from now at the latest."""
        if self._last_heard.get(peer, -math.inf) < now:
            self._last_heard[peer] = now

    def opened(self, peer: int, request_id: str) -> None:
        open_with_peer = self._open_by_peer.get(peer)
        if open_with_peer is None:
            open_with_peer = self._open_by_peer[peer] = set()
        open_with_peer.add(request_id)

    def closed(self, peer: int, request_id: str) -> None:
        open_with_peer = self._open_by_peer.get(peer)
        if open_with_peer is not None:
            open_with_peer.discard(request_id)
            if not open_with_peer:
                del self._open_by_peer[peer]

    @property
    def any_open(self) -> bool:
        return bool(self._open_by_peer)

    def open_count(self, peer: int) -> int:
        return len(self._open_by_peer.get(peer, ()))

    def lapsed(self, now: float, probe: Callable[[int], str | None] | None = None,
               ) -> Iterator[tuple[int, str, list[str]]]:
        """``(peer, why, its open request ids)`` for each peer whose lease lapsed or that
        ``probe`` (the transport's ``peer_lost``) reports lost. Cost: O(peers with open
        transfers)."""
        for peer, request_ids in list(self._open_by_peer.items()):
            lost = None if probe is None else probe(peer)
            if lost is not None:
                yield peer, lost, list(request_ids)
                continue
            last = self._last_heard.get(peer)
            if last is not None and now - last > self.lease_s:
                yield peer, f"no message from rank {peer} for {now - last:.1f}s", \
                    list(request_ids)

    def heartbeat_due(self, now: float) -> bool:
        return now >= self._next_heartbeat

    def heartbeats(self, now: float, also: Iterable[int] = ()) -> list[tuple[int, int, int]]:
        """``(peer, sequence, open requests)`` for each heartbeat to send now: to every peer
        with open transfers and to ``also`` (peers whose early advertises wait here)."""
        self._next_heartbeat = now + self.heartbeat_every_s
        peers = set(self._open_by_peer)
        peers.update(also)
        return [(peer, next(self._sequence), self.open_count(peer)) for peer in peers]
