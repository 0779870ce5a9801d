"""``ControlPlane``: the handshake, the outcome handshake, early advertises, and the peer's
FAIL / CANCEL.

The handshake, for one request::

    receiver: receive()  -> pin blocks, take a staging buffer, post the receive(s),
                            send ADVERTISE(request, blocks, bytes, layout fingerprint, data
                            tag, chunks, want checksum, tokens, encoded layout)
    sender:   ADVERTISE  -> validate against its own send(); a mismatch fails both sides
                            with a typed reason (CANCEL goes back, its detail naming each
                            differing layout field with both values); else gather the blocks
                            into a staging buffer and post the send(s); once every chunk is
                            posted, ACCEPT(metadata, checksum of the bytes sent if asked)
    receiver: all final  -> scatter; once the ACCEPT is in too (either order): keep its
         and ACCEPT         metadata, compare the checksum, report OK; once its outcome is
                            COMPLETE (the TP group agreed), DONE
    sender:   DONE       -> CONFIRMED: the outcome is success (complete once quiescent too)

*The outcome handshake.* The receiver is the one side that knows whether every byte landed,
so it decides the outcome and the sender adopts it: DONE (success) or the receiver's FAIL /
CANCEL, whose reason the sender takes as its own (``_PEER_VERDICT``: both sides report the
same reason). A sender that posted therefore never decides alone that its transfer failed:
its own operation error is only a detail (the receiver sees whether the bytes arrived), and
its deadline waits ``confirm_grace_s`` past the receiver's. Only when the receiver goes
silent (lease) or never answers (that deadline) does the sender give up, and its failure
then says ``outcome_unknown``: never plain success, never a known failure.

An ADVERTISE that arrives before the host's ``send()`` is kept under (source rank, request
id) (at most ``max_early_advertises`` per source, each for at most the queue timeout) and
answered when the send to that very rank comes: junk from one rank can neither take another
rank's request id nor crowd out its advertises. Telling the peer about a failure uses two
words: *FAIL* ("my posted operations run to completion: complete yours") and *CANCEL*
("nothing of mine is or will be in flight: abort yours"); see ``DataPath.wind_down``. Every
incoming message is decoded and validated first: a malformed one, or a DONE / ACCEPT from
the wrong rank or for an unknown request, is counted, logged and dropped, touching no
session.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from kvhandoff.engine import _wire as wire
from kvhandoff.engine._agreement import OK
from kvhandoff.engine._transfer import Transfer, WindDown
from kvhandoff.engine.errors import LayoutDecodeError
from kvhandoff.engine.layout import KVLayout
from kvhandoff.engine.transports import MAX_CONTROL_BYTES
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
    wire.FailReason.CHECKSUM_MISMATCH: FailureReason.CHECKSUM_MISMATCH,
}

#: A sender that posted adopts its receiver's verdict: the receiver's reason, as its own.
_PEER_VERDICT: dict[wire.FailReason, FailureReason] = {
    **_WIRE_TO_REASON,
    wire.FailReason.TIMEOUT: FailureReason.TRANSFER_TIMEOUT,
    wire.FailReason.TRANSPORT_ERROR: FailureReason.TRANSPORT_ERROR,
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
    FailureReason.CHECKSUM_MISMATCH: wire.FailReason.CHECKSUM_MISMATCH,
}

#: Distinct receiver layouts whose verdict is remembered (``_layout_mismatch``).
_MAX_LAYOUT_VERDICTS = 64
_UNSEEN = object()

_EarlyKey = tuple[int, str]  # (source rank, request id)
_EarlyAdvertise = tuple[wire.Advertise, float]  # (message, arrived at)


def _clip(text: str) -> str:
    """``text`` within ``MAX_DETAIL_BYTES`` of UTF-8 (cut at a character boundary)."""
    raw = text.encode("utf-8")
    if len(raw) <= wire.MAX_DETAIL_BYTES:
        return text
    return raw[:wire.MAX_DETAIL_BYTES - 3].decode("utf-8", "ignore") + "..."


class ControlPlane:
    """The control messages of one engine: what it sends, and what it does with what
    arrives. Session changes go through the engine (``engine._apply``)."""

    def __init__(self, engine: TransferEngine) -> None:
        self._engine = engine
        self._transport = engine.transport
        self._max_early = engine.config.max_early_advertises
        self._queue_timeout_s = engine.config.queue_timeout_s
        self._want_checksum = engine.config.checksum
        self.rejected = 0
        self.frames_sent = 0
        # Messages queued this tick, per peer, encoded (``flush`` sends them as frames).
        self._outbox: dict[int, list[bytes]] = {}
        # The receivers' encoded layouts seen, with what ``_layout_mismatch`` said of each:
        # every advertise carries one, and a job's receivers have a handful at most.
        self._layout_verdicts: dict[bytes, wire.Fail | None] = {}
        self._early: collections.OrderedDict[_EarlyKey, _EarlyAdvertise] = (
            collections.OrderedDict())
        # How many early advertises each peer has waiting (changed only by on_advertise and
        # take_early): the per-peer bound, and heartbeats find those peers without a scan.
        self.early_sources: collections.Counter[int] = collections.Counter()

    # --- sending ---------------------------------------------------------------------------

    def send(self, peer: int, message: wire.ControlMessage) -> None:
        """Queue ``message`` for ``peer``: it leaves with the tick's frames (``flush``)."""
        encoded = wire.encode(message)
        box = self._outbox.get(peer)
        if box is None:
            self._outbox[peer] = [encoded]
        else:
            box.append(encoded)

    @property
    def has_outgoing(self) -> bool:
        return bool(self._outbox)

    def flush(self) -> None:
        """Send every queued message: per peer, in the order queued, as few frames as fit
        in ``MAX_CONTROL_BYTES`` each (a frame is the messages back to back)."""
        outbox, self._outbox = self._outbox, {}
        for peer, box in outbox.items():
            if len(box) == 1:
                self._send_frame(peer, box[0])
                continue
            frame: list[bytes] = []
            size = 0
            for encoded in box:
                if size + len(encoded) > MAX_CONTROL_BYTES:
                    self._send_frame(peer, b"".join(frame))
                    frame, size = [], 0
                frame.append(encoded)
                size += len(encoded)
            self._send_frame(peer, b"".join(frame))

    def _send_frame(self, peer: int, frame: bytes) -> None:
        self.frames_sent += 1
        try:
            self._transport.send_control(peer, frame)
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
            want_checksum=self._want_checksum, num_tokens=transfer.num_tokens,
            layout=self._engine.layout_bytes,
        ))
        transfer.want_checksum = self._want_checksum

    def accept(self, transfer: Transfer) -> None:
        """Every chunk is gathered and posted: send the receiver the host's metadata and,
        when it asked, our checksum of the bytes."""
        checksum = self._engine._datapath.checksum(transfer) if transfer.want_checksum else 0
        self.send(transfer.peer, wire.Accept(
            transfer.request_id, transfer.data_tag, checksum, transfer.metadata))

    def done(self, transfer: Transfer) -> None:
        """This receiver's outcome is COMPLETE: confirm it to the sender."""
        transfer.peer_told = True
        self.send(transfer.peer, wire.Done(transfer.request_id))

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
        """One arrived control payload: a frame of messages, each handled in order. Each
        malformed message is rejected (a malformed header ends its frame: see ``_wire``)."""
        self._engine._leases.heard(source, now)  # any message renews the peer's lease
        messages, errors = wire.decode_frame(payload)
        for message in messages:
            kind = type(message)
            if kind is wire.Advertise:
                self.on_advertise(source, message, now)  # type: ignore[arg-type]
            elif kind is wire.Done:
                self._on_done(source, message, now)  # type: ignore[arg-type]
            elif kind is wire.Accept:
                self._on_accept(source, message, now)  # type: ignore[arg-type]
            elif kind is wire.Fail or kind is wire.Cancel:
                self._on_peer_failure(source, message, now)  # type: ignore[arg-type]
        for error in errors:
            self.reject(source, "decode", f"{type(error).__name__}: {error}")

    def on_advertise(self, source: int, advertise: wire.Advertise, now: float) -> None:
        engine = self._engine
        rid = advertise.request_id
        transfer = engine._transfers.get(rid)
        if transfer is None:
            key = (source, rid)
            if key in self._early or self.early_sources[source] >= self._max_early:
                self.reject(source, "advertise",
                            f"duplicate or one too many early advertise for {rid!r}")
                self.send(source, wire.Cancel(
                    rid, wire.FailReason.DUPLICATE_REQUEST, "advertise not accepted"))
            else:  # the receiver was faster than our host's send(): keep it until then
                self._early[key] = (advertise, now)
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
        mismatch = self._layout_mismatch(advertise) or wire.validate_advertise(
            advertise, request_id=rid, block_count=len(transfer.block_ids),
            total_bytes=transfer.total_nbytes, layout_fingerprint=engine.layout_fingerprint,
            num_chunks=transfer.num_chunks, num_tokens=transfer.num_tokens,
            block_tokens=engine.pool.layout.block_tokens,
        )
        if mismatch is not None:
            # CANCEL: we post nothing, so the receiver must cancel its receives.
            self.send(source, wire.Cancel(rid, mismatch.reason, mismatch.detail))
            transfer.peer_told = True
            engine._apply(transfer, Event.ABORT, now, reason=_WIRE_TO_REASON[mismatch.reason],
                          detail=mismatch.detail)
            return
        engine._leases.engaged(source, now)
        engine._datapath.start_send(transfer, advertise.data_tag, now,
                                    want_checksum=advertise.want_checksum)

    def _layout_mismatch(self, advertise: wire.Advertise) -> wire.Fail | None:
        """The receiver's layout (from its advertise) against our pool's: a ``Fail`` naming
        every differing field with both values, or None when they agree (the fingerprint,
        checked next, still covers the engines' ``layout_extra``)."""
        if not advertise.layout:
            return None  # not described: the fingerprint alone decides
        verdicts = self._layout_verdicts
        known = verdicts.get(advertise.layout, _UNSEEN)
        if known is not _UNSEEN:
            if known is None:
                return None
            return wire.Fail(advertise.request_id, known.reason, known.detail)
        verdict = self._judge_layout(advertise)
        if len(verdicts) >= _MAX_LAYOUT_VERDICTS:
            verdicts.clear()  # many distinct layouts: junk, or a very mixed job; start over
        verdicts[advertise.layout] = verdict
        return verdict

    def _judge_layout(self, advertise: wire.Advertise) -> wire.Fail | None:
        try:
            theirs = KVLayout.decode(advertise.layout)
        except LayoutDecodeError as exc:
            return wire.Fail(advertise.request_id, wire.FailReason.PROTOCOL_ERROR,
                             _clip(f"the receiver's layout is unreadable: {exc}"))
        differences = self._engine.pool.layout.diff(theirs)
        if not differences:
            return None
        detail = "layout: " + "; ".join(f"{d.field} receiver {d.there!r}, sender {d.here!r}"
                                        for d in differences)
        return wire.Fail(advertise.request_id, wire.FailReason.LAYOUT_MISMATCH,
                         _clip(detail))

    def take_early(self, request_id: str, source: int) -> wire.Advertise | None:
        """The advertise that ``source`` sent for ``request_id`` before the host's send(),
        if any (an advertise from any other rank is not this send's)."""
        early = self._early.pop((source, request_id), None)
        if early is None:
            return None
        self.early_sources[source] -= 1
        if not self.early_sources[source]:
            del self.early_sources[source]
        return early[0]

    def _on_done(self, source: int, message: wire.Done, now: float) -> None:
        """The receiver's confirmation: every byte landed and its side completed."""
        engine = self._engine
        rid = message.request_id
        transfer = engine._transfers.get(rid)
        if transfer is None or transfer.peer != source or transfer.role is not Role.SENDER:
            if transfer is None and engine.was_released(rid):
                return  # a late word on a transfer already settled and released here
            self.reject(source, "done", f"{rid!r} is not a send to rank {source}")
            return
        session = transfer.session
        if session.confirmed or not session.allows(Event.CONFIRMED):
            # Failed here already: only a lapsed lease or the extended deadline fails a
            # posted sender without the receiver's word, and that failure said the
            # outcome was unknown. The first outcome stays.
            return
        engine._apply(transfer, Event.CONFIRMED, now)
        # The receiver is done with this transfer and says nothing more about it: its
        # silence from now on is no sign of a lost peer.
        engine._leases.closed(source, rid)
        # Its bytes landed, so a send still pending here (wedged, or slow to report) need
        # not finish: cancel it, best effort, so the blocks come back sooner.
        for op in transfer.ops:
            if op is not None and not op.final:
                op.cancel()
        engine._agreement.report(rid, OK)

    def _on_accept(self, source: int, message: wire.Accept, now: float) -> None:
        """The sender posted every chunk: keep its metadata (and checksum, when asked for);
        a receive whose bytes already landed settles now."""
        engine = self._engine
        rid = message.request_id
        transfer = engine._transfers.get(rid)
        if (transfer is None or transfer.peer != source or transfer.role is not Role.RECEIVER
                or transfer.accepted or message.data_tag != transfer.data_tag):
            if transfer is None and engine.was_released(rid):
                return
            self.reject(source, "accept", f"{rid!r} is not a receive from rank {source} "
                        "waiting for its accept")
            return
        transfer.accepted = True
        transfer.metadata = message.metadata
        if transfer.want_checksum:
            transfer.sent_checksum = message.checksum
        self._settle_received(transfer, now)

    def received(self, transfer: Transfer, now: float) -> None:
        """A receiver's bytes are in its blocks: report OK once the sender's ACCEPT is in
        too (else when it comes) and the checksum, when asked for, matched the sender's."""
        if transfer.want_checksum:
            transfer.landed_checksum = self._engine._datapath.checksum(transfer)
        self._settle_received(transfer, now)

    def _settle_received(self, transfer: Transfer, now: float) -> None:
        engine = self._engine
        session = transfer.session
        if not session.local_final or session.failure is not None or not transfer.accepted:
            return  # not landed yet, failed meanwhile, or the sender's ACCEPT is on its way
        if not transfer.want_checksum or transfer.sent_checksum == transfer.landed_checksum:
            engine._agreement.report(transfer.request_id, OK)
            return
        engine._apply(transfer, Event.ABORT, now, reason=FailureReason.CHECKSUM_MISMATCH,
                      detail=f"sender {transfer.sent_checksum:#010x}, "
                             f"landed {transfer.landed_checksum:#010x}")

    def _on_peer_failure(self, source: int, message: wire.Fail | wire.Cancel,
                         now: float) -> None:
        engine = self._engine
        rid = message.request_id
        if self.take_early(rid, source) is not None:
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
        # A sender that posted adopts the receiver's verdict, reason included.
        reasons = _PEER_VERDICT if transfer.role is Role.SENDER and transfer.posted \
            else _WIRE_TO_REASON
        engine._apply(transfer, Event.ABORT, now, reason=reasons[message.reason],
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
            (source, rid), (_, at) = next(iter(early.items()))
            if now - at < timeout:
                break
            self.take_early(rid, source)
            self.send(source, wire.Cancel(rid, wire.FailReason.UNKNOWN_REQUEST,
                                          "no matching send within the queue timeout"))
