"""``Admission``: taking a host's requests into the engine, one at a time or as a batch.

Admitting a transfer is validating its arguments (the request id against the wire's bounds,
the peer, the block ids once, the token count against the blocks, the metadata), pinning
its blocks and entering its session into the table and its ``Transfer`` into the engine;
every step before the entry raises a typed error with nothing changed. A batch is validated
as a whole (each a ``TransferRequest``, no id twice, no metadata on a receive), pinned as a
whole (``BlockPool.pin_many``: all or none) and only then entered. An error after some
entries (only the unforeseen: every check passed) is undone (``_undo``): what was not
entered gives back its pins and a receive's data tags; what was entered is cancelled and
released the normal way. An entry that fails half-way takes its session out of the table
again (``SessionTable.discard``), so "entered" means exactly "in ``engine._transfers``".
Posting and advertising stay the engine's (``TransferEngine.receive`` and the batched
calls); this part only admits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from kvhandoff.engine import _wire as wire
from kvhandoff.engine._handle import TransferHandle, TransferRequest
from kvhandoff.engine._transfer import Transfer
from kvhandoff.engine.errors import EngineClosedError, EngineConfigError
from kvhandoff.sessions import (
    DuplicateSessionError,
    Event,
    InvalidArgumentError,
    Role,
    check_block_ids,
)

if TYPE_CHECKING:
    from kvhandoff.engine._engine import TransferEngine

__all__ = ["Admission", "handles_of"]


def handles_of(transfers: Sequence[Transfer]) -> list[TransferHandle]:
    """The handles of just-admitted transfers (made at admission; a transfer may be
    released later in the same call, which cuts its link to the handle)."""
    handles = [transfer.handle for transfer in transfers]
    assert all(handle is not None for handle in handles)
    return handles  # type: ignore[return-value]


class _Admitted(NamedTuple):
    """A request's arguments once validated (``Admission._validate``)."""

    request_id: str
    block_ids: tuple[int, ...]
    peer: int
    layerwise: bool
    num_tokens: int
    metadata: bytes


class Admission:
    """The admission of one engine. Sessions enter its table only here."""

    def __init__(self, engine: TransferEngine) -> None:
        self._engine = engine
        self._num_layers = engine.pool.num_layers

    def check_admissible(self, request_id: str, peer: int) -> None:
        """``EngineConfigError``, ``EngineClosedError`` or ``DuplicateSessionError`` unless a
        request ``request_id`` to or from ``peer`` may be admitted now."""
        engine = self._engine
        if not isinstance(request_id, str) or not request_id:
            raise EngineConfigError("request_id", request_id, "a non-empty str")
        try:
            size = len(request_id.encode("utf-8"))
        except UnicodeEncodeError:
            raise EngineConfigError("request_id", request_id, "valid UTF-8 text") from None
        if size > wire.MAX_REQUEST_ID_BYTES:
            raise EngineConfigError("request_id", f"{size} bytes of UTF-8",
                                    f"at most {wire.MAX_REQUEST_ID_BYTES} bytes (the control "
                                    "messages carry it)")
        if not engine._accepting:
            raise EngineClosedError(request_id, "the engine is draining")
        if request_id in engine._transfers:
            raise DuplicateSessionError(request_id)
        world, me = engine.transport.world_size, engine.transport.rank
        if isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer < world \
                or peer == me:
            raise EngineConfigError("peer", peer,
                                    f"a rank in 0..{world - 1} other than this rank ({me})")

    def admit(self, request_id: str, block_ids: Iterable[int], peer: int, role: Role,
              layerwise: bool, *, checked: bool = False, num_tokens: int | None = None,
              metadata: bytes = b"", data_tag: int = 0) -> Transfer:
        """Validate (``checked``: the id and peer were already), pin, admit: every failure
        leaves the pool and the table as they were. ``data_tag``: a receive's first
        reserved tag."""
        admission = self._validate(request_id, block_ids, peer, layerwise, num_tokens,
                                   metadata, checked=checked)
        self._engine.pool.pin(admission.block_ids, owner=request_id)  # range-checks the ids
        try:
            return self._enter(admission, role, data_tag)
        except BaseException:
            self._undo([admission], [])  # a receive's tags are its caller's
            raise

    def admit_many(self, requests: Iterable[TransferRequest], role: Role, *,
                   checked: bool = False, data_tags: Sequence[int] = ()) -> list[Transfer]:
        """``admit`` for a batch, all or none: every request is validated and every pin
        checked before anything changes."""
        batch = list(requests)
        try:
            admissions = [self._validate(r.request_id, r.block_ids, r.peer, r.layerwise,
                                         r.num_tokens, r.metadata, checked=checked)
                          for r in batch]
            self._engine.pool.pin_many([(a.block_ids, a.request_id) for a in admissions])
        except BaseException:
            self._free_tags_of(batch, data_tags, range(len(batch)))
            raise
        transfers: list[Transfer] = []
        try:
            for index, admission in enumerate(admissions):
                transfers.append(self._enter(admission, role,
                                             data_tags[index] if data_tags else 0))
        except BaseException:
            # Every check passed, so only the unforeseen (MemoryError, an interrupt) gets
            # here: the host gets no handle for any of the batch.
            self._undo(admissions, data_tags)
            self._engine._end_call()
            raise
        return transfers

    def _undo(self, admissions: Sequence[_Admitted], data_tags: Sequence[int]) -> None:
        """After an admission failed part-way: those not admitted give back their pins and
        tags; those admitted (in ``_transfers``) are cancelled (nothing of theirs is posted
        or advertised yet) and released the normal way, their pins and tags with them."""
        engine = self._engine
        now = engine._clock()
        rest = [i for i, a in enumerate(admissions) if a.request_id not in engine._transfers]
        engine.pool.unpin_many([(admissions[i].block_ids, admissions[i].request_id)
                                for i in rest])
        self._free_tags_of(admissions, data_tags, rest)
        for admission in admissions:
            transfer = engine._transfers.get(admission.request_id)
            if transfer is not None and transfer.session.allows(Event.CANCEL):
                engine._apply(transfer, Event.CANCEL, now)

    def _free_tags_of(self, requests: Sequence[TransferRequest | _Admitted],
                      data_tags: Sequence[int], indexes: Iterable[int]) -> None:
        """Give back the data tags reserved for ``requests[i]``, ``i`` in ``indexes``
        (receives only: ``data_tags`` is empty for sends)."""
        for index in indexes:
            if index < len(data_tags):
                count = self._num_layers if requests[index].layerwise else 1
                self._engine._datapath.free_tags(data_tags[index], count)

    def batch(self, requests: Iterable[TransferRequest], role: Role) -> list[TransferRequest]:
        """A batched call's requests, checked as a whole: each a ``TransferRequest``, no
        request id twice, admissible (``check_admissible``), no metadata on a receive."""
        batch = list(requests) if not isinstance(requests, (str, bytes)) else [requests]
        seen: set[str] = set()
        for request in batch:
            if not isinstance(request, TransferRequest):
                raise EngineConfigError("requests", request, "TransferRequest items")
            if request.request_id in seen:
                raise DuplicateSessionError(request.request_id)
            seen.add(request.request_id)
            if role is Role.RECEIVER and request.metadata:
                raise EngineConfigError("metadata", f"{len(request.metadata)} bytes",
                                        "none on a receive (the sender's metadata comes in "
                                        "the result)")
            self.check_admissible(request.request_id, request.peer)
        return batch

    def _validate(self, request_id: str, block_ids: Iterable[int], peer: int,
                  layerwise: bool, num_tokens: int | None, metadata: bytes, *,
                  checked: bool) -> _Admitted:
        if not checked:
            self.check_admissible(request_id, peer)
        try:
            ids = check_block_ids(block_ids)  # the one validation of the ids
        except InvalidArgumentError as exc:
            raise EngineConfigError("block_ids", exc.value, exc.expected) from None
        if not ids:
            raise EngineConfigError("block_ids", ids, "at least one block id")
        tokens = self._check_tokens(num_tokens, len(ids))
        if isinstance(metadata, (bytearray, memoryview)):
            metadata = bytes(metadata)
        if type(metadata) is not bytes or len(metadata) > wire.MAX_METADATA_BYTES:
            raise EngineConfigError("metadata", metadata if type(metadata) is not bytes
                                    else f"{len(metadata)} bytes",
                                    f"bytes, at most {wire.MAX_METADATA_BYTES}")
        return _Admitted(request_id, ids, peer, bool(layerwise), tokens, metadata)

    def _enter(self, admission: _Admitted, role: Role, data_tag: int) -> Transfer:
        """Enter a validated, pinned transfer into the table and the engine."""
        engine = self._engine
        config = engine.config
        now = engine._clock()
        request_id, ids, peer = admission.request_id, admission.block_ids, admission.peer
        session = engine._table.admit(
            request_id, role, peer, ids, now, queue_timeout_s=config.queue_timeout_s,
            transfer_timeout_s=config.transfer_timeout_s,
            confirm_grace_s=(config.sender_confirm_grace_s if role is Role.SENDER else None))
        try:
            chunks = self._num_layers if admission.layerwise else 1
            chunk_nbytes = engine._datapath.chunk_nbytes(len(ids), admission.num_tokens, chunks)
            transfer = Transfer(session=session, layerwise=admission.layerwise,
                                num_chunks=chunks, chunk_nbytes=chunk_nbytes, expected=chunks,
                                num_tokens=admission.num_tokens,
                                metadata=admission.metadata, data_tag=data_tag)
            transfer.handle = TransferHandle(transfer, engine._on_layer_ready)
            engine._leases.opened(peer, request_id)
            engine._transfers[request_id] = transfer
        except BaseException:
            # Not admitted after all: the caller gives back its pins and tags.
            engine._leases.closed(peer, request_id)
            engine._table.discard(request_id)
            raise
        # From here on it is admitted (in ``_transfers``): a failure below is the caller's
        # to cancel, never to unpin (``_undo``).
        if engine._log_on:  # ``history`` is a copy: make it only to log it
            engine._log_transitions(transfer, session.history)
        if engine._agreement.known(request_id):  # the TP group already spoke about it
            engine._group.decide(request_id, now)
        engine._poke()
        return transfer

    def _check_tokens(self, num_tokens: int | None, blocks: int) -> int:
        """The tokens a transfer of ``blocks`` blocks carries: ``num_tokens`` when it needs
        exactly that many blocks, every slot when None; ``EngineConfigError`` otherwise."""
        block_tokens = self._engine.pool.layout.block_tokens
        if num_tokens is None:
            return blocks * block_tokens
        low, high = (blocks - 1) * block_tokens + 1, blocks * block_tokens
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or \
                not low <= num_tokens <= high:
            raise EngineConfigError("num_tokens", num_tokens,
                                    f"an int in {low}..{high} ({blocks} blocks of "
                                    f"{block_tokens} tokens)")
        return num_tokens
