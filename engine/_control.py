"""``ControlPlane``: the handshake, early advertises, and the peer's FAIL / CANCEL.

The handshake, for one request::

    receiver: receive()  -> pin blocks, take a staging buffer, post the receive(s),
                            send ADVERTISE(request, blocks, bytes, layout, data tag, chunks)
    sender:   ADVERTISE  -> validate against its own send(); a mismatch fails both sides
                            with a typed reason (CANCEL goes back); else gather the blocks
                            into a staging buffer and post the send(s)

An ADVERTISE that arrives before the host's ``send()`` is kept (at most
``max_early_advertises``, each for at most the queue timeout) and answered when the send
comes. Telling the peer about a failure uses two words: *FAIL* ("my posted operations run to
completion: complete yours") and *CANCEL* ("nothing of mine is or will be in flight: abort
yours"); see ``DataPath.wind_down``. Every incoming message is decoded and validated first: a
malformed one is counted, logged and dropped, touching no session.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from kvhandoff.engine import _wire as wire
from kvhandoff.engine._transfer import Transfer, WindDown
from kvhandoff.engine.transports.errors import ProtocolError
from kvhandoff.sessions import Event, FailureReason, Role

if TYPE_CHECKING:
    from kvhandoff.engine._engine import TransferEngine

__all__ = ["ControlPlane"]

#: What a peer's reason means here.
_WIRE_TO_REASON: dict[wire.FailReason, FailureReason] = {
    wire.FailReason.SIZE_MISMATCH: FailureReason.SIZE_MISMATCH,
    wire.FailReason.BLOCK_COUNT_MISMATCH: FailureReason.SIZE_MISMATCH,
    wire.FailReason.LAYOUT_MISMATCH: FailureReason.LAYOUT_MISMATCH,
    wire.FailReason.CHUNK_MISMATCH: FailureReason.LAYOUT_MISMATCH,
    wire.FailReason.UNKNOWN_REQUEST: FailureReason.PROTOCOL_ERROR,
    wire.FailReason.DUPLICATE_REQUEST: FailureReason.PROTOCOL_ERROR,
    wire.FailReason.PROTOCOL_ERROR: FailureReason.PROTOCOL_ERROR,
    wire.FailReason.CANCELLED: FailureReason.CANCELLED,
    wire.FailReason.TIMEOUT: FailureReason.PEER_FAILED,
    wire.FailReason.PEER_LOST: FailureReason.PEER_LOST,
    wire.FailReason.TRANSPORT_ERROR: FailureReason.PEER_FAILED,
    wire.FailReason.SHUTDOWN: FailureReason.PEER_FAILED,
    wire.FailReason.INTERNAL: FailureReason.PEER_FAILED,
}

#: What we tell the peer for a failure here.
_REASON_TO_WIRE: dict[FailureReason, wire.FailReason] = {
    FailureReason.QUEUE_TIMEOUT: wire.FailReason.TIMEOUT,
    FailureReason.TRANSFER_TIMEOUT: wire.FailReason.TIMEOUT,
    FailureReason.TRANSPORT_ERROR: wire.FailReason.TRANSPORT_ERROR,
    FailureReason.PEER_LOST: wire.FailReason.PEER_LOST,
    FailureReason.PEER_FAILED: wire.FailReason.INTERNAL,
    FailureReason.CANCELLED: wire.FailReason.CANCELLED,
    FailureReason.LAYOUT_MISMATCH: wire.FailReason.LAYOUT_MISMATCH,
    FailureReason.SIZE_MISMATCH: wire.FailReason.SIZE_MISMATCH,
    FailureReason.PROTOCOL_ERROR: wire.FailReason.PROTOCOL_ERROR,
}

_EarlyAdvertise = tuple[int, wire.Advertise, float]  # (source rank, message, arrived at)


class ControlPlane:
    """The control messages of one engine: what it sends, and what it does with what
    arrives. Session changes go through the engine (``engine._apply``)."""

    def __init__(self, engine: TransferEngine) -> None:
        self._engine = engine
        self._transport = engine.transport
        self._max_early = engine.config.max_early_advertises
        self._queue_timeout_s = engine.config.queue_timeout_s
        self.rejected = 0
        self._early: collections.OrderedDict[str, _EarlyAdvertise] = collections.OrderedDict()
        # How many early advertises each peer has waiting (changed only by _keep_early and
        # take_early), so heartbeats find those peers without scanning the advertises.
        self.early_sources: collections.Counter[int] = collections.Counter()

    # --- sending ---------------------------------------------------------------------------

    def send(self, peer: int, message: wire.ControlMessage) -> None:
        try:
            self._transport.send_control(peer, wire.encode(message))
        except Exception as exc:  # a closed or broken transport must not break the loop
            engine = self._engine
            if engine._log_on:
                engine._log.warning("control.send_failed", peer=peer, error=repr(exc))

    def advertise(self, transfer: Transfer) -> None:
        """Tell the sender where our posted receive(s) wait."""
        self.send(transfer.peer, wire.Advertise(
            request_id=transfer.request_id, block_count=len(transfer.block_ids),
            total_bytes=transfer.total_nbytes,
            layout_fingerprint=self._engine.layout_fingerprint,
            data_tag=transfer.data_tag, num_chunks=transfer.num_chunks,
        ))

    def tell_failure(self, transfer: Transfer, reason: FailureReason,
                     detail: str | None) -> None:
        """Tell the peer once that the transfer failed here: CANCEL when nothing of ours is or
        will be in flight (the peer must abort its side), FAIL when our posted operations run
        to completion (the peer should complete its own)."""
        if transfer.peer_told:
            return
        transfer.peer_told = True
        kind = (wire.Cancel if transfer.wind_down is WindDown.ABORT or not transfer.posted
                else wire.Fail)
        self.send(transfer.peer, kind(transfer.request_id, _REASON_TO_WIRE[reason],
                                      (detail or "")[:wire.MAX_DETAIL_BYTES]))

    def heartbeat(self, peer: int, sequence: int, open_requests: int) -> None:
        self.send(peer, wire.Heartbeat(
            sender_rank=self._transport.rank, sequence=sequence,
            open_requests=min(open_requests, wire.MAX_OPEN_REQUESTS)))

    # --- receiving -------------------------------------------------------------------------

    def on_message(self, source: int, payload: bytes, now: float) -> None:
        self._engine._leases.heard(source, now)  # any message renews the peer's lease
        try:
            message = wire.decode(payload)
        except ProtocolError as exc:
            self.reject(source, "decode", f"{type(exc).__name__}: {exc}")
            return
        if isinstance(message, wire.Advertise):
            self.on_advertise(source, message, now)
        elif isinstance(message, (wire.Fail, wire.Cancel)):
            self._on_peer_failure(source, message, now)

    def on_advertise(self, source: int, advertise: wire.Advertise, now: float) -> None:
        engine = self._engine
        rid = advertise.request_id
        transfer = engine._transfers.get(rid)
        if transfer is None:
            if rid in self._early or len(self._early) >= self._max_early:
                self.reject(source, "advertise",
                            f"duplicate or one too many early advertise for {rid!r}")
                self.send(source, wire.Cancel(
                    rid, wire.FailReason.DUPLICATE_REQUEST, "advertise not accepted"))
            else:  # the receiver was faster than our host's send(): keep it until then
                self._early[rid] = (source, advertise, now)
                self.early_sources[source] += 1
            return
        if transfer.role is not Role.SENDER or transfer.peer != source:
            self.reject(source, "advertise", f"{rid!r} is not a send to rank {source}")
            self.send(source, wire.Cancel(rid, wire.FailReason.UNKNOWN_REQUEST,
                                          "no matching send on this rank"))
            return
        if not transfer.session.allows(Event.ADVERTISE):
            self.reject(source, "advertise", f"second advertise for {rid!r}")
            return
        mismatch = wire.validate_advertise(
            advertise, request_id=rid, block_count=len(transfer.block_ids),
            total_bytes=transfer.total_nbytes, layout_fingerprint=engine.layout_fingerprint,
            num_chunks=transfer.num_chunks,
        )
        if mismatch is not None:
            # CANCEL: we post nothing, so the receiver must cancel its receives.
            self.send(source, wire.Cancel(rid, mismatch.reason, mismatch.detail))
            transfer.peer_told = True
            engine._apply(transfer, Event.ABORT, now, reason=_WIRE_TO_REASON[mismatch.reason],
                          detail=mismatch.detail)
            return
        engine._leases.engaged(source, now)
        engine._datapath.start_send(transfer, advertise.data_tag, now)

    def take_early(self, request_id: str) -> tuple[int, wire.Advertise] | None:
        """The advertise that arrived for ``request_id`` before the host's send(), if any."""
        early = self._early.pop(request_id, None)
        if early is None:
            return None
        source = early[0]
        self.early_sources[source] -= 1
        if not self.early_sources[source]:
            del self.early_sources[source]
        return source, early[1]

    def _on_peer_failure(self, source: int, message: wire.Fail | wire.Cancel,
                         now: float) -> None:
        engine = self._engine
        rid = message.request_id
        early = self._early.get(rid)
        if early is not None and early[0] == source:
            self.take_early(rid)
            return
        transfer = engine._transfers.get(rid)
        if transfer is None or transfer.peer != source:
            if transfer is None and engine.was_released(rid):
                return  # a late word on a transfer already settled and released here
            self.reject(source, message.KIND.name.lower(), f"unknown request {rid!r}")
            return
        cancel = isinstance(message, wire.Cancel)
        if transfer.outcome_known:
            # Already failed here; the first reason stays. A CANCEL still means the peer's
            # side will never complete, so ours must abort.
            if cancel and transfer.wind_down is not WindDown.ABORT:
                transfer.wind_down = WindDown.ABORT
                engine._datapath.wind_down(transfer, now)
            return
        detail = f"rank {source}: {message.reason.label}"
        if message.detail:
            detail = f"{detail} ({message.detail})"
        if cancel:
            transfer.wind_down = WindDown.ABORT
        # The peer knows the outcome; a sender that posted nothing must still say CANCEL,
        # since the receiver would otherwise wait for sends that never come.
        transfer.peer_told = cancel or transfer.role is Role.RECEIVER or bool(transfer.posted)
        engine._apply(transfer, Event.ABORT, now, reason=_WIRE_TO_REASON[message.reason],
                      detail=detail[:wire.MAX_DETAIL_BYTES])

    def reject(self, source: int, what: str, detail: str) -> None:
        self.rejected += 1
        engine = self._engine
        if engine._log_on:
            engine._log.warning("control.rejected", source=source, what=what, detail=detail)

    # --- early advertises ------------------------------------------------------------------

    @property
    def has_early(self) -> bool:
        return bool(self._early)

    @property
    def early_count(self) -> int:
        return len(self._early)

    def expire_early(self, now: float) -> None:
        """Answer the early advertises no send() claimed within the queue timeout."""
        timeout = self._queue_timeout_s
        if timeout is None:
            return
        early = self._early
        while early:
            rid, (source, _, at) = next(iter(early.items()))
            if now - at < timeout:
                break
            self.take_early(rid)
            self.send(source, wire.Cancel(rid, wire.FailReason.UNKNOWN_REQUEST,
                                          "no matching send within the queue timeout"))
