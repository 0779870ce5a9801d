"""``DataPath``: posting data operations, their completions, and how failed ones wind down.

A transfer moves as one chunk, or one per layer (layer-wise), and each chunk as ``pieces``
operations of about ``PIECE_BYTES`` on the chunk's tag, in order (``Transfer``). Two paths
carry the same bytes, so each side chooses its own:

- *Regions* (zero-copy), when the transport moves regions natively and the transfer's
  regions are large enough (``EngineConfig.region_min_bytes``): each operation is the
  ``block_regions`` of its blocks, the sender's blocks are read and the receiver's written
  by the transport itself, with no staging buffer in between.
- *Staged, pipelined*, otherwise: the sender gathers each piece into the staging buffer and
  posts it at once, so piece k+1 is gathered while piece k is in flight; the receiver
  scatters each piece into its blocks as soon as it lands, while later pieces still move.

The staging window. A staged side holds at most ``EngineConfig.staging_window`` (W) pieces:
a transfer of more operations than that stages through W slots (``Transfer.slots``) instead
of one buffer of its size. The sender gathers operation k into a free slot and posts it;
k + W waits for a slot, freed when a send is final (``on_op_final``). The receiver posts its
first W receives (then ADVERTISE, as before), and as each piece lands, in order per chunk,
it is checksummed and scattered and its slot carries the next receive. A windowed side
posts strictly in operation order (layer-wise: a layer ready early waits for the layers
before it), which is what makes the windows of the two sides safe together whatever each's
W: the lowest operation not final yet is posted on both sides (every one before it is
final on both), so it matches, and same-tag operations match in posting order (MPI,
loopback), so later pieces still pair up. The checksum of a staged side is fed piece by
piece as the pieces are gathered or land (``_checksum.piece_crc``), never read back from a
staging buffer that no longer holds the transfer.

Only the valid token slots of the last block move (``_tokens``): the last piece of each
chunk, which holds the last block, cuts each tensor's last block to the ``BlockTail`` the
token count gives (a shorter last region on the region path, a region copy instead of the
block kernels for that one piece on the staged path). The piece count is a function of the
chunk's bytes (those that move) and block count only, and the tail of the count and the
layout, all of which the advertise validates (block count, token count, total bytes,
layout, chunks), so both sides derive the same operations without carrying them.

Each posted operation's handle carries its transfer (``op.token``), so a completion finds
its transfer in O(1). With no staging buffer the
transport touches the pool's own memory: the blocks stay pinned until every operation is
final, exactly as the staging buffer does (a quarantined transfer keeps both).

Failure. The error surfaces to the host at once while the blocks stay pinned; the data
operations are then settled in one of two ways (``WindDown``). *Abort* when the peer's side
can no longer complete (the transfer deadline passed, the peer's lease lapsed, the peer sent
CANCEL, posting failed here): cancel what is pending and tell the peer CANCEL. *Complete*
otherwise (a transport error, the peer's FAIL, the TP group's failure, the host's cancel): a
sender posts its remaining chunks so that every receive the receiver posted is matched (a
windowed sender as its slots free up), the receiver keeps its receives (a windowed receiver
keeps moving its window to the end, its bytes discarded, because its sender posts every
piece), and the peer is told FAIL: every posted receive is matched or cancelled. Completing
matters because MPI cannot cancel a posted send: a receiver that cancelled its receives would
leave the sender's blocks pinned for good. A completing transfer still aborts at the transfer
deadline, so a wedged transport cannot hold its blocks forever unless the transport itself
can neither finish nor cancel the operation, which health then reports.

One-sided transports (``Transport.one_sided``: NIXL). A receive there is memory the peer may
write at any time until the peer says it is done with it; nothing the receiver does locally
ends it (``cancel()`` is False), and there is nothing to complete, because no posted send
waits for a matching receive. So both wind-downs do the same: post nothing more, cancel the
sends still waiting for an advertisement, and ``retract()`` each pending receive, which stays
pending (its blocks pinned) until the peer answers: DONE if its WRITE had landed, FAILED
"cancelled" if it never wrote, or "peer lost" once the transport's fencing grace has passed.
A posted WRITE is never cancelled and runs to NIXL's final status, so a sender past its
deadline stays quarantined until then. A chunk moves as one operation there (no pieces: the
region path has no gather or scatter to overlap).
"""

from __future__ import annotations

import heapq
import itertools
from typing import TYPE_CHECKING

import numpy as np
import torch
from kvhandoff.engine import _tokens
from kvhandoff.engine import _wire as wire
from kvhandoff.engine._checksum import blocks_checksum, checksum_of_chunks, piece_crc
from kvhandoff.engine._staging import StagingPool
from kvhandoff.engine._transfer import Transfer, WindDown
from kvhandoff.engine.errors import DataTagsExhaustedError, LayerReadyError
from kvhandoff.engine.transports import HandleKind, HandleState, TransportHandle
from kvhandoff.engine.transports._regions import BlockTail, block_regions
from kvhandoff.sessions import OPEN_STATES, Event, FailureReason, Role

if TYPE_CHECKING:
    from kvhandoff.engine._engine import TransferEngine

__all__ = ["PIECE_BYTES", "DataPath"]

#: The size of one operation of a large chunk: big enough that per-operation costs vanish,
#: small enough that the gather of one piece overlaps the move of the one before. Part of
#: the wire contract (both sides derive the same pieces from it): change it on every rank.
PIECE_BYTES = 4 << 20


class DataPath:
    """The data operations of one engine. Session changes go through the engine
    (``engine._apply``); the peer is told through its control plane."""

    def __init__(self, engine: TransferEngine) -> None:
        self._engine = engine
        self._transport = engine.transport
        pool = engine.pool
        self._layers = pool.layers
        self._layer_pairs = [pool.layers[2 * i:2 * i + 2] for i in range(pool.num_layers)]
        self._num_layers = pool.num_layers
        # The region path: offered by the transport, for regions of at least this average.
        self._moves_regions = self._transport.moves_regions
        # One-sided (NIXL): a receive is final only on the peer's word (``retract``).
        self._one_sided = self._transport.one_sided
        min_bytes = engine.config.region_min_bytes
        self._region_min_bytes = (self._transport.region_min_bytes if min_bytes is None
                                  else min_bytes)
        self._tensor_block_nbytes = pool.block_nbytes // len(pool.layers)
        self._slots = _tokens.TokenSlots(pool.layout, pool.layers)
        self.staging = StagingPool(device=pool.device)
        self._window = engine.config.staging_window
        self._tags_in_use: set[int] = set()
        self._next_tag = 1
        # Completing wind-downs, by the time they abort: (when, tiebreak, transfer).
        self._abort_at: list[tuple[float, int, Transfer]] = []
        self._abort_seq = itertools.count()
        config = engine.config
        self._abort_grace_s = config.transfer_timeout_s or config.lease_s
        # Counters (EngineStats), and the progress not yet handed to the health monitor.
        self.bytes_sent = self.bytes_received = 0
        self.progress_completions = self.progress_bytes = 0

    # --- tags ------------------------------------------------------------------------------

    def reserve_tags(self, request_id: str, count: int) -> int:
        """The first of ``count`` consecutive free data tags, now in use; raises
        ``DataTagsExhaustedError`` (changing nothing) when no such range is free."""
        top = self._transport.max_tag - count + 1
        for _ in range(len(self._tags_in_use) + 1):
            first = self._next_tag
            self._next_tag = first + count if first + count <= top else 1
            tags = range(first, first + count)
            if first + count - 1 <= self._transport.max_tag and \
                    self._tags_in_use.isdisjoint(tags):
                self._tags_in_use.update(tags)
                return first
        raise DataTagsExhaustedError(request_id, count, self._transport.max_tag,
                                     len(self._tags_in_use))

    def free_tags(self, first: int, count: int) -> None:
        self._tags_in_use.difference_update(range(first, first + count))

    # --- starting --------------------------------------------------------------------------

    def chunk_nbytes(self, blocks: int, num_tokens: int, num_chunks: int) -> int:
        """The bytes one of ``num_chunks`` chunks of a transfer of ``blocks`` blocks holding
        ``num_tokens`` tokens moves: its tensors' blocks, the last one's valid slots only
        (``_tokens``). What the advertise carries and the sender validates."""
        return self._slots.chunk_nbytes(blocks, num_tokens, len(self._layers) // num_chunks)

    def _plan(self, transfer: Transfer) -> None:
        """Choose the operations of a transfer (its pieces) and this side's path."""
        ids = transfer.block_ids
        blocks = len(ids)
        # Both sides know the count (the advertise carries it, the sender validates it), so
        # both cut the last block alike, and every piece but the last is whole blocks.
        transfer.tail = self._slots.tail(transfer.num_tokens, blocks)
        tensors = len(self._chunk_layers(transfer, 0))
        transfer.short_nbytes = tensors * self._slots.left_out(transfer.num_tokens, blocks)
        # One-sided (NIXL): one WRITE per chunk. Pieces buy overlap of a gather or scatter
        # with the move; on the region path there is neither, and each piece would cost an
        # advertisement, two descriptor lists and a DONE. Both sides run the same transport,
        # so both derive the same count.
        pieces = 1 if self._one_sided else max(1, min(blocks,
                                                       transfer.chunk_nbytes // PIECE_BYTES))
        transfer.pieces = pieces
        transfer.piece_bounds = tuple(p * blocks // pieces for p in range(pieces + 1))
        transfer.expected = transfer.num_ops
        transfer.ops = [None] * transfer.num_ops
        transfer.regions = self._moves_regions and self._large_regions(ids, transfer.tail)
        if transfer.regions:
            return
        transfer.crcs = [0] * transfer.num_chunks
        if transfer.role is Role.RECEIVER:
            transfer.consumed = [0] * transfer.num_chunks
        if transfer.num_ops <= self._window:  # the whole transfer fits in the window
            transfer.staging = self.staging.acquire(transfer.total_nbytes)
            return
        bounds = transfer.piece_bounds
        widest = max(bounds[p + 1] - bounds[p] for p in range(pieces))
        transfer.window = self._window
        transfer.slot_nbytes = widest * transfer.block_chunk_nbytes
        transfer.free_slots = list(range(self._window - 1, -1, -1))  # pop() gives slot 0
        transfer.staging = self.staging.acquire(self._window * transfer.slot_nbytes)

    def _large_regions(self, ids: tuple[int, ...], tail: BlockTail | None) -> bool:
        """Whether the regions of ``ids`` (a run of consecutive ids is one region per
        tensor; a partly valid last block's ``tail`` adds ``tail.runs - 1`` and moves less)
        average at least ``region_min_bytes``."""
        if not self._region_min_bytes:
            return True
        if len(ids) == 1:
            runs = 1
        else:
            runs = 1 + int(np.count_nonzero(np.diff(np.asarray(ids)) != 1))
        nbytes = self._tensor_block_nbytes * len(ids)
        if tail is not None:
            runs += tail.runs - 1
            nbytes -= self._tensor_block_nbytes - tail.total
        return nbytes >= self._region_min_bytes * runs

    def _planned(self, transfer: Transfer, now: float) -> bool:
        """``_plan``, or the transfer failed here (nothing posted, the peer told CANCEL)
        when planning raised: its staging memory could not be had, say. False then."""
        try:
            self._plan(transfer)
        except Exception as exc:  # one transfer's trouble must not break the loop
            self.local_error(transfer, FailureReason.TRANSPORT_ERROR,
                             f"planning the transfer failed: {exc!r}", now)
            return False
        return True

    def start_receive(self, transfer: Transfer, now: float) -> bool:
        """Post the receives of a transfer (its tags are reserved): every one, or the first
        window's worth; False when planning or posting failed (the transfer is failed then,
        and nothing may be advertised)."""
        if not self._planned(transfer, now):
            return False
        if transfer.windowed:
            return self._post_receives(transfer, now)
        return all(self._post(transfer, HandleKind.RECV, index, now)
                   for index in range(transfer.num_ops))

    def start_send(self, transfer: Transfer, data_tag: int, now: float, *,
                   want_checksum: bool = False) -> None:
        """The receiver advertised: post the whole send, or each layer already produced."""
        transfer.data_tag = data_tag
        transfer.want_checksum = want_checksum
        if not self._planned(transfer, now):
            return
        self._engine._apply(transfer, Event.ADVERTISE, now)
        if not transfer.layerwise:
            self._post_chunk(transfer, 0, now)
            return
        # One operation per layer, in layer order, however many were ready already: batching
        # by what happens to be ready would give ranks different granularities (seed 003).
        for layer in sorted(transfer.layers_ready):
            self._post_chunk(transfer, layer, now)

    def layer_ready(self, transfer: Transfer, layer: int, now: float) -> bool:
        """Mark a layer of a layer-wise send produced; True when it was posted now."""
        if not transfer.layerwise or transfer.role is not Role.SENDER:
            raise LayerReadyError(transfer.request_id, layer, "a layer-wise send's handle")
        if (isinstance(layer, bool) or not isinstance(layer, int)
                or not 0 <= layer < self._num_layers):
            raise LayerReadyError(transfer.request_id, layer,
                                  f"a layer index in 0..{self._num_layers - 1}")
        if layer in transfer.layers_ready:
            raise LayerReadyError(transfer.request_id, layer, "a layer not marked ready yet")
        if transfer.layers_ready:
            transfer.layers_ready.add(layer)
        else:  # the first: the default is a shared empty tuple (``_transfer._UNSET``)
            transfer.layers_ready = {layer}
        if transfer.state in OPEN_STATES and transfer.posted < transfer.expected:
            self._post_chunk(transfer, layer, now)
            return True
        return False

    # --- posting ---------------------------------------------------------------------------

    @staticmethod
    def _may_post(transfer: Transfer) -> bool:
        """Whether more operations may be posted: not after an abort, and after a failure
        only in a completing wind-down."""
        return transfer.wind_down is not WindDown.ABORT \
            and transfer.posted < transfer.expected \
            and (transfer.wind_down is WindDown.COMPLETE or not transfer.outcome_known)

    def _post_chunk(self, transfer: Transfer, chunk: int, now: float) -> None:
        """Post the operations of one chunk not posted yet, in order, each gathered just
        before it is posted (staged) so the next gather overlaps its move; windowed, post
        what the window allows in operation order instead (``_post_sends``)."""
        if transfer.windowed:
            self._post_sends(transfer, now)
            return
        first = chunk * transfer.pieces
        for index in range(first, first + transfer.pieces):
            if not self._may_post(transfer):
                return
            if transfer.ops[index] is None and not self._send_piece(transfer, index, now):
                return

    def _post_sends(self, transfer: Transfer, now: float) -> None:
        """A windowed sender: post the next operations, in order, while a slot is free and
        their chunk is produced (any chunk, in a completing wind-down)."""
        while transfer.free_slots and self._may_post(transfer):
            index = transfer.posted  # posted in order: the next one
            if transfer.layerwise and transfer.wind_down is not WindDown.COMPLETE and \
                    index // transfer.pieces not in transfer.layers_ready:
                return
            if not self._send_piece(transfer, index, now):
                return

    def _send_piece(self, transfer: Transfer, index: int, now: float) -> bool:
        """Gather operation ``index`` (staged: into its slot, feeding the checksum) and post
        it; the last one sends ACCEPT. False when it failed (the transfer is failed then)."""
        if not transfer.regions:
            chunk = index // transfer.pieces
            if transfer.windowed:
                transfer.slots[index] = transfer.free_slots.pop()
            view = transfer.op_view(index)
            try:
                _tokens.gather(self._chunk_layers(transfer, chunk), transfer.piece_ids(index),
                               view, transfer.piece_tail(index))
                if transfer.want_checksum:
                    transfer.crcs[chunk] = piece_crc(view, transfer.crcs[chunk])
            except Exception as exc:  # a bad block table must fail this transfer only
                self.local_error(transfer, FailureReason.TRANSPORT_ERROR, repr(exc), now)
                return False
        if not self._post(transfer, HandleKind.SEND, index, now):
            return False
        if transfer.posted == transfer.num_ops:  # the receiver waits for it (metadata)
            self._engine._control.accept(transfer)
        return True

    def _post_receives(self, transfer: Transfer, now: float) -> bool:
        """A windowed receiver: post the next receives, in order, into the free slots;
        False when posting failed."""
        while transfer.free_slots and transfer.wind_down is not WindDown.ABORT \
                and transfer.posted < transfer.expected:
            index = transfer.posted
            transfer.slots[index] = transfer.free_slots.pop()
            if not self._post(transfer, HandleKind.RECV, index, now):
                return False
        return True

    def _chunk_layers(self, transfer: Transfer, chunk: int) -> list[torch.Tensor]:
        return self._layer_pairs[chunk] if transfer.layerwise else self._layers

    def _post(self, transfer: Transfer, kind: HandleKind, index: int, now: float) -> bool:
        """Post one data operation; the first takes the session ``IN_FLIGHT`` (through
        ``ADVERTISED`` for a receiver, which advertises right after posting)."""
        chunk = index // transfer.pieces
        tag = transfer.data_tag + chunk
        transport = self._transport
        try:
            if transfer.regions:
                regions = block_regions(self._chunk_layers(transfer, chunk),
                                        transfer.piece_ids(index), transfer.piece_tail(index))
                if kind is HandleKind.SEND:
                    op = transport.post_send_regions(regions, transfer.peer, tag)
                else:
                    op = transport.post_recv_regions(regions, transfer.peer, tag)
            elif kind is HandleKind.SEND:
                op = transport.post_send(transfer.op_view(index), transfer.peer, tag)
            else:
                op = transport.post_recv(transfer.op_view(index), transfer.peer, tag)
        except Exception as exc:
            self.local_error(transfer, FailureReason.TRANSPORT_ERROR, repr(exc), now)
            return False
        op.token = transfer
        transfer.ops[index] = op
        transfer.op_index[id(op)] = index
        transfer.posted += 1
        transfer.ops_pending += 1
        if transfer.posted == 1:  # only the first operation moves the session
            session = transfer.session
            if session.allows(Event.ADVERTISE):
                self._engine._apply(transfer, Event.ADVERTISE, now)
            if session.allows(Event.POSTED):
                self._engine._apply(transfer, Event.POSTED, now, handle=transfer)
        return True

    def local_error(self, transfer: Transfer, reason: FailureReason, detail: str,
                    now: float) -> None:
        """Posting failed here: what was posted is aborted (the peer is told CANCEL)."""
        transfer.wind_down = WindDown.ABORT
        session = transfer.session
        if session.failure is not None:  # already failed: only the wind-down changes
            self.wind_down(transfer, now)
        elif session.allows(Event.ABORT):
            self._engine._apply(transfer, Event.ABORT, now, reason=reason, detail=detail[:256])

    # --- completions -----------------------------------------------------------------------

    def on_op_final(self, op: TransportHandle, now: float) -> None:
        transfer = op.token
        engine = self._engine
        if not isinstance(transfer, Transfer) or \
                engine._transfers.get(transfer.request_id) is not transfer:
            return
        transfer.ops_pending -= 1
        self.progress_completions += 1
        done = op.state is HandleState.DONE
        if done:
            self.progress_bytes += op.nbytes
            if op.kind is HandleKind.SEND:
                self.bytes_sent += op.nbytes
            else:
                self.bytes_received += op.nbytes
        elif transfer.op_error is None:
            transfer.op_error = op.error or "transport error"
            # A sender's error decides nothing: the receiver sees whether the bytes landed
            # and its word (DONE, or FAIL / CANCEL) is the outcome (see ``_control.py``).
            if transfer.role is Role.RECEIVER and not transfer.outcome_known \
                    and not transfer.quiescent_ops:
                # Other operations may still touch the buffer: surface the error now and
                # keep everything pinned (quarantine) until they are final.
                engine._apply(transfer, Event.ABORT, now, reason=FailureReason.TRANSPORT_ERROR,
                              detail=transfer.op_error[:256])
        if not transfer.regions and engine._transfers.get(transfer.request_id) is transfer:
            index = transfer.op_index[id(op)]
            if op.kind is HandleKind.RECV:
                transfer.arrived[index] = done
                self._landed(transfer, index // transfer.pieces)
                if transfer.windowed:
                    self._post_receives(transfer, now)
            elif transfer.windowed:
                transfer.free_slots.append(transfer.slots.pop(index))
                self._post_sends(transfer, now)
        if transfer.quiescent_ops and transfer.session.allows(Event.HANDLE_DONE):
            self._local_final(transfer, now)

    def _local_final(self, transfer: Transfer, now: float) -> None:
        """Every operation of the transfer is final: the session is quiescent here."""
        session = transfer.session
        if session.local_final:
            return
        engine = self._engine
        if session.failure is not None or session.cancel_requested:
            # The outcome is already failure; HANDLE_DONE settles it (the reason stays).
            engine._apply(transfer, Event.HANDLE_DONE, now)
            return
        if transfer.role is Role.SENDER:
            # Quiescent here; the outcome is the receiver's word (an error of ours included).
            engine._apply(transfer, Event.HANDLE_DONE, now)
            if session.confirmed:
                engine._group.decide(transfer.request_id, now)
            return
        if transfer.op_error is not None:
            engine._apply(transfer, Event.HANDLE_FAILED, now,
                          reason=FailureReason.TRANSPORT_ERROR, detail=transfer.op_error[:256])
            return
        # The one place the received data is known to be in the blocks: the transport wrote
        # them (regions), or each staged piece was scattered as it landed (``_landed``),
        # unless a scatter failed.
        if transfer.scatter_error is not None:
            engine._apply(transfer, Event.HANDLE_FAILED, now,
                          reason=FailureReason.TRANSPORT_ERROR,
                          detail=transfer.scatter_error[:256])
            return
        engine._apply(transfer, Event.HANDLE_DONE, now)
        engine._control.received(transfer, now)

    def _landed(self, transfer: Transfer, chunk: int) -> None:
        """Staged receives of ``chunk`` are final: consume those now in order (a piece may
        complete before the one ahead of it): checksum and scatter each into its blocks,
        while later pieces still move, unless the transfer already failed or the receive
        did (its bytes are discarded then), and free its slot. A scatter error is kept for
        ``_local_final``, which reports it."""
        first = chunk * transfer.pieces
        arrived = transfer.arrived
        session = transfer.session
        while transfer.consumed[chunk] < transfer.pieces:
            index = first + transfer.consumed[chunk]
            if index not in arrived:
                return
            landed = arrived.pop(index)
            transfer.consumed[chunk] += 1
            if landed and session.failure is None and not session.cancel_requested \
                    and transfer.op_error is None and transfer.scatter_error is None:
                try:
                    view = transfer.op_view(index)
                    if transfer.want_checksum:
                        transfer.crcs[chunk] = piece_crc(view, transfer.crcs[chunk])
                    self._scatter(transfer, index)
                except Exception as exc:
                    transfer.scatter_error = repr(exc)
            if transfer.windowed:
                transfer.free_slots.append(transfer.slots.pop(index))

    def checksum(self, transfer: Transfer) -> int:
        """The checksum of the bytes this side moved (``_checksum``): fed piece by piece as
        they were gathered or landed (staged), or the same bytes read from the blocks on the
        region path."""
        if not transfer.regions:
            return checksum_of_chunks(transfer.crcs)
        groups = (self._layer_pairs if transfer.layerwise else [self._layers])
        pieces = [transfer.piece_ids(i) for i in range(transfer.pieces)]
        return blocks_checksum(groups, pieces, transfer.tail)

    def _scatter(self, transfer: Transfer, index: int) -> None:
        _tokens.scatter(transfer.op_view(index),
                        self._chunk_layers(transfer, index // transfer.pieces),
                        transfer.piece_ids(index), transfer.piece_tail(index))

    # --- wind-down -------------------------------------------------------------------------

    def wind_down(self, transfer: Transfer, now: float) -> None:
        """Settle the data operations of a failed or cancelled transfer: *abort* (cancel
        what is pending, post nothing more) when ``transfer.wind_down`` says so, else
        *complete* (see the module docstring). Idempotent."""
        session = transfer.session
        if session.is_terminal:
            return
        if transfer.wind_down is WindDown.ABORT:
            transfer.expected = transfer.posted
            self._stop_pending(transfer)
        elif transfer.wind_down is WindDown.NONE:
            transfer.wind_down = WindDown.COMPLETE
            if self._one_sided:
                # Nothing needs completing: a receiver's memory is freed by the peer's word,
                # not by a matching send. Post nothing more, cancel the sends still waiting
                # for an advertisement, retract the advertisements; posted WRITEs run on.
                transfer.expected = transfer.posted
                self._stop_pending(transfer)
            elif transfer.role is Role.SENDER and transfer.posted:
                ops, pieces = transfer.ops, transfer.pieces
                for chunk in range(transfer.num_chunks):
                    if None in ops[chunk * pieces:(chunk + 1) * pieces]:
                        self._post_chunk(transfer, chunk, now)
            elif transfer.role is Role.RECEIVER and transfer.windowed and transfer.posted:
                # Its sender posts every piece (it completes too): keep the window moving
                # to the end so each send is matched (``on_op_final``).
                pass
            else:
                transfer.expected = transfer.posted
            if transfer.ops_pending:
                heapq.heappush(self._abort_at, (now + self._abort_grace_s,
                                                next(self._abort_seq), transfer))
        if transfer.quiescent_ops and transfer.posted and \
                session.allows(Event.HANDLE_DONE) and not session.local_final:
            self._local_final(transfer, now)

    def _stop_pending(self, transfer: Transfer) -> None:
        """Cancel each pending operation; a one-sided receive, which only its peer can end,
        is retracted instead. Neither makes an operation final here: its memory stays in use
        until the transport says it is (see ``on_op_final``)."""
        for op in transfer.ops:
            if op is not None and not op.final and not op.cancel() and self._one_sided:
                op.retract()

    def abort_due(self, now: float) -> bool:
        """Completing wind-downs whose transfer deadline passed: abort them (and tell the
        peer to abort its side). Cost: O(due)."""
        due = self._abort_at
        engine = self._engine
        busy = False
        while due and due[0][0] <= now:
            _, _, transfer = heapq.heappop(due)
            if (engine._transfers.get(transfer.request_id) is not transfer
                    or not transfer.ops_pending or transfer.wind_down is WindDown.ABORT):
                continue
            busy = True
            transfer.wind_down = WindDown.ABORT
            engine._control.send(transfer.peer, wire.Cancel(
                transfer.request_id, wire.FailReason.TIMEOUT,
                "operations still pending at the transfer deadline"))
            self.wind_down(transfer, now)
        return busy

    @property
    def has_aborts_due(self) -> bool:
        return bool(self._abort_at)

    # --- release ---------------------------------------------------------------------------

    def release(self, transfer: Transfer) -> None:
        """The transfer left the table: hand back its staging buffer and tags, and cut the
        operation -> transfer links (nothing follows them any more)."""
        if transfer.staging is not None:
            self.staging.release(transfer.staging)
            transfer.staging = None
        for op in transfer.ops:
            if op is not None:
                op.token = None
        if transfer.role is Role.RECEIVER and transfer.data_tag:
            self.free_tags(transfer.data_tag, transfer.num_chunks)
