"""A transport that records the size of every send it posts (faults: none)."""

from __future__ import annotations

from typing import Any

from kvhandoff.engine.transports import FaultyTransport, Transport, TransportHandle


class CountingTransport(FaultyTransport):
    """``inner`` unchanged (a fault-free FaultyTransport), plus the bytes of each send."""

    def __init__(self, inner: Transport) -> None:
        super().__init__(inner, seed=0)
        self.sends: list[int] = []

    def post_send(self, buf: Any, peer: int, tag: int) -> TransportHandle:
        self.sends.append(int(buf.numel() * buf.element_size()))
        return super().post_send(buf, peer, tag)

    def post_send_regions(self, regions: Any, peer: int, tag: int) -> TransportHandle:
        self.sends.append(int(regions.nbytes))  # a region send (zero-copy) counts the same
        return super().post_send_regions(regions, peer, tag)

    def send_sizes(self) -> list[int]:
        return sorted(self.sends)
