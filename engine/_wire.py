"""The control-message wire format: a fixed, versioned binary layout built with ``struct``.

Theory of operation. Control messages carry the handshake of a transfer (the receiver
advertises its posted receive, the sender accepts or fails it), cancels, failures, lease
renewals and completion notices. They cross a process boundary, so they are data, never
code: no pickle, no eval, nothing but integers and short UTF-8 strings at fixed places.

Every message is ``header + body``::

    header (8 bytes, network byte order): magic b"KVHC" | version u8 | kind u8 | body_len u16

and each kind's body is a fixed ``struct`` followed by its length-prefixed strings (the
lengths live in the fixed part). ``decode`` checks, in order: the header is complete, the
magic, the version, the kind, the body length against the input (truncated or trailing
bytes), each string's UTF-8, then every field's range and the consistency of fields with
each other. Anything wrong raises a ``ProtocolError`` subclass and nothing else, for any
input whatsoever, so a receiver can drop a bad message without any session being touched.
Message objects run the same range checks when constructed, so an invalid message cannot
be built or sent either.

*Frames.* One control payload (what a transport's ``send_control`` carries, at most
``MAX_CONTROL_BYTES``) is a *frame*: one or more messages back to back, each with its own
header, so an engine sends everything due to one peer in one tick as one payload
(``encode`` each message, concatenate, ``decode_frame`` on the other side). The headers
delimit the messages: a message whose body is malformed is dropped alone (its header still
says where the next one starts); a malformed header ends the frame there (the messages
before it stand, the bytes after it cannot be delimited and are dropped with it).

Bumping ``WIRE_VERSION`` is required for any change of layout; a receiver rejects versions
it does not speak with ``UnsupportedVersionError`` rather than guessing. Version 2 added the
outcome handshake's fields: ADVERTISE's ``flags`` (bit 0: the receiver wants a checksum of
the moved bytes), ACCEPT's ``checksum``, and the ``checksum_mismatch`` reason. Version 3
added ADVERTISE's ``num_tokens`` and ``layout`` (the receiver's encoded ``KVLayout``, so a
mismatch names its fields) and ACCEPT's ``metadata`` (the sender's opaque bytes for the
receiver); both are length-prefixed bytes, carried as they are and never interpreted here.
Version 4 made a control payload a frame of several messages, and changed what the data
carries: only the valid token slots of the last block move, and ADVERTISE's
``total_bytes`` counts those bytes (a version-3 peer would move whole blocks).
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Sequence
from typing import ClassVar, TypeAlias

import attrs
from kvhandoff.engine.transports.errors import (
    BadEncodingError,
    BadMagicError,
    FieldRangeError,
    ProtocolError,
    TrailingBytesError,
    TruncatedMessageError,
    UnknownKindError,
    UnsupportedVersionError,
)

__all__ = [
    "MAGIC",
    "MAX_BLOCK_COUNT",
    "MAX_CHUNKS",
    "MAX_DATA_TAG",
    "MAX_DETAIL_BYTES",
    "MAX_LAYOUT_FIELD_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_METADATA_BYTES",
    "MAX_REQUEST_ID_BYTES",
    "MAX_TOTAL_BYTES",
    "MAX_TOTAL_TOKENS",
    "WIRE_VERSION",
    "Accept",
    "Advertise",
    "Cancel",
    "ControlMessage",
    "Done",
    "Fail",
    "FailReason",
    "Heartbeat",
    "MessageKind",
    "decode",
    "decode_frame",
    "encode",
    "layout_fingerprint",
    "validate_advertise",
]

MAGIC = b"KVHC"
WIRE_VERSION = 4

MAX_REQUEST_ID_BYTES = 256
MAX_DETAIL_BYTES = 256
MAX_BLOCK_COUNT = 2**24
MAX_TOTAL_BYTES = 2**40
# Layer-wise transfers send one chunk per layer (or per layer group); no model has more.
MAX_CHUNKS = 2**16
MAX_DATA_TAG = 2**31 - 1
MAX_OPEN_REQUESTS = 2**24
MAX_TOTAL_TOKENS = 2**40
#: ADVERTISE's encoded layout (``kvhandoff.engine.layout.MAX_LAYOUT_BYTES`` fits in it).
MAX_LAYOUT_FIELD_BYTES = 1024
#: ACCEPT's per-transfer metadata: small enough that the largest ACCEPT fits in one control
#: message (``transports.MAX_CONTROL_BYTES``, 4096) with a maximal request id.
MAX_METADATA_BYTES = 3072
_U64_MAX = 2**64 - 1

_HEADER = struct.Struct("!4sBBH")
HEADER_SIZE = _HEADER.size

# Fixed parts of each body; string lengths (u16) come last and the strings follow in order.
# block_count, total_bytes, fingerprint, tag, chunks, flags, num_tokens, rid, layout
_ADVERTISE = struct.Struct("!IQQIIBQHH")
_ACCEPT = struct.Struct("!IIHH")  # data_tag, checksum, rid, metadata
#: ADVERTISE flags: the receiver wants the sender's checksum of the bytes (in ACCEPT).
FLAG_WANT_CHECKSUM = 1
_KNOWN_FLAGS = FLAG_WANT_CHECKSUM
_REASONED = struct.Struct("!HHH")  # reason, rid, detail (CANCEL and FAIL)
_HEARTBEAT = struct.Struct("!IQI")  # sender_rank, sequence, open_requests
_DONE = struct.Struct("!H")  # rid

# The largest possible message: the header and the largest body of any kind.
MAX_MESSAGE_BYTES = HEADER_SIZE + max(
    _ADVERTISE.size + MAX_REQUEST_ID_BYTES + MAX_LAYOUT_FIELD_BYTES,
    _ACCEPT.size + MAX_REQUEST_ID_BYTES + MAX_METADATA_BYTES,
    _REASONED.size + MAX_REQUEST_ID_BYTES + MAX_DETAIL_BYTES)


class MessageKind(enum.IntEnum):
    """The kind byte of the header."""

    ADVERTISE = 1
    ACCEPT = 2
    CANCEL = 3
    FAIL = 4
    HEARTBEAT = 5
    DONE = 6


class FailReason(enum.IntEnum):
    """Why a transfer failed or was cancelled; travels as a u16 code. ``label`` is the
    lower-case name used in logs and session failure reasons (e.g. ``peer_lost``)."""

    SIZE_MISMATCH = 1
    LAYOUT_MISMATCH = 2
    BLOCK_COUNT_MISMATCH = 3
    CHUNK_MISMATCH = 4
    UNKNOWN_REQUEST = 5
    DUPLICATE_REQUEST = 6
    CANCELLED = 7
    TIMEOUT = 8
    PEER_LOST = 9
    TRANSPORT_ERROR = 10
    PROTOCOL_ERROR = 11
    SHUTDOWN = 12
    INTERNAL = 13
    #: The receiver's checksum of what landed differs from the sender's of what it sent.
    CHECKSUM_MISMATCH = 14

    @property
    def label(self) -> str:
        return self.name.lower()


def _check_int(field: str, value: object, low: int, high: int) -> None:
    # bool is an int subclass but never a valid count or tag.
    if type(value) is not int or not low <= value <= high:
        raise FieldRangeError(field, value, f"an int in {low}..{high}")


def _check_text(field: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, str):
        raise FieldRangeError(field, value, "a str")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates cannot travel as UTF-8
        raise BadEncodingError(field) from None
    if not low <= size <= high:
        raise FieldRangeError(field, value, f"{low}..{high} bytes of UTF-8, got {size}")


def _check_bytes(field: str, value: object, high: int) -> None:
    if type(value) is not bytes:
        raise FieldRangeError(field, value, "bytes")
    if len(value) > high:
        raise FieldRangeError(field, f"{len(value)} bytes", f"at most {high} bytes")


def _check_reason(value: object) -> None:
    if type(value) is FailReason:
        return
    raise FieldRangeError("reason", value, "a FailReason")


@attrs.frozen
class Advertise:
    """Receiver -> sender: "my receive is posted". ``total_bytes`` is the whole transfer;
    it must be a multiple of ``num_chunks`` (layer-wise chunks have one size) and, when
    every slot moves (``num_tokens`` 0), of ``block_count`` (blocks have one size; with a
    count only the last block's valid slots move). Chunk ``i`` travels on data tag ``data_tag + i``.
    ``want_checksum``: the sender must answer with ACCEPT carrying its checksum of the bytes
    it sent, which the receiver compares with what landed before it confirms (DONE).
    ``num_tokens`` is how many tokens the receive takes (the last block may be partly
    valid; 0: not said, every slot of every block); ``layout`` the receiver's encoded
    ``KVLayout`` (empty: not sent)."""

    KIND: ClassVar[MessageKind] = MessageKind.ADVERTISE
    request_id: str
    block_count: int
    total_bytes: int
    layout_fingerprint: int
    data_tag: int
    num_chunks: int = 1
    want_checksum: bool = False
    num_tokens: int = 0
    layout: bytes = b""

    def __attrs_post_init__(self) -> None:
        _check_text("request_id", self.request_id, 1, MAX_REQUEST_ID_BYTES)
        _check_int("block_count", self.block_count, 1, MAX_BLOCK_COUNT)
        _check_int("total_bytes", self.total_bytes, 1, MAX_TOTAL_BYTES)
        _check_int("layout_fingerprint", self.layout_fingerprint, 0, _U64_MAX)
        _check_int("num_chunks", self.num_chunks, 1, MAX_CHUNKS)
        _check_int("data_tag", self.data_tag, 1, MAX_DATA_TAG - (self.num_chunks - 1))
        if type(self.want_checksum) is not bool:
            raise FieldRangeError("want_checksum", self.want_checksum, "a bool")
        _check_int("num_tokens", self.num_tokens, 0, MAX_TOTAL_TOKENS)
        _check_bytes("layout", self.layout, MAX_LAYOUT_FIELD_BYTES)
        if not self.num_tokens and self.total_bytes % self.block_count:
            raise FieldRangeError(
                "total_bytes", self.total_bytes, f"a multiple of block_count={self.block_count}"
            )
        if self.total_bytes % self.num_chunks:
            raise FieldRangeError(
                "total_bytes", self.total_bytes, f"a multiple of num_chunks={self.num_chunks}"
            )


@attrs.frozen
class Accept:
    """Sender -> receiver: the advertise was validated and every chunk is posted;
    ``checksum`` is the sender's checksum (``kvhandoff.engine._checksum``) of the bytes it
    sent (0 unless the advertise asked for it, ``want_checksum``); ``metadata`` is the
    host's opaque bytes for the receiver (at most ``MAX_METADATA_BYTES``), delivered in its
    ``TransferResult``. Always sent: the receiver's outcome waits for it."""

    KIND: ClassVar[MessageKind] = MessageKind.ACCEPT
    request_id: str
    data_tag: int
    checksum: int = 0
    metadata: bytes = b""

    def __attrs_post_init__(self) -> None:
        _check_text("request_id", self.request_id, 1, MAX_REQUEST_ID_BYTES)
        _check_int("data_tag", self.data_tag, 1, MAX_DATA_TAG)
        _check_int("checksum", self.checksum, 0, 2**32 - 1)
        _check_bytes("metadata", self.metadata, MAX_METADATA_BYTES)


@attrs.frozen
class Cancel:
    """Either side -> the other: this transfer failed and nothing of the sender's side is or
    will be in flight (never posted, or cancelled), so the peer must cancel its own posted
    operations. Each side keeps its memory pinned until its own transport is quiescent."""

    KIND: ClassVar[MessageKind] = MessageKind.CANCEL
    request_id: str
    reason: FailReason = FailReason.CANCELLED
    detail: str = ""

    def __attrs_post_init__(self) -> None:
        _check_text("request_id", self.request_id, 1, MAX_REQUEST_ID_BYTES)
        _check_reason(self.reason)
        _check_text("detail", self.detail, 0, MAX_DETAIL_BYTES)


@attrs.frozen
class Fail:
    """Either side -> the other: this transfer failed, with a typed reason and a short
    human-readable detail (at most 256 bytes of UTF-8), but the sender's posted operations run
    to completion (a sending side posts its remaining chunks), so the peer should let its own
    complete rather than cancel them: over a transport that cannot cancel a posted send, that
    is what lets both sides become quiescent."""

    KIND: ClassVar[MessageKind] = MessageKind.FAIL
    request_id: str
    reason: FailReason
    detail: str = ""

    def __attrs_post_init__(self) -> None:
        _check_text("request_id", self.request_id, 1, MAX_REQUEST_ID_BYTES)
        _check_reason(self.reason)
        _check_text("detail", self.detail, 0, MAX_DETAIL_BYTES)


@attrs.frozen
class Heartbeat:
    """Lease renewal: ``sender_rank`` is alive; ``sequence`` grows by one per heartbeat so a
    receiver can tell a fresh renewal from a duplicate; ``open_requests`` is how many
    transfers the sender has open with the receiver."""

    KIND: ClassVar[MessageKind] = MessageKind.HEARTBEAT
    sender_rank: int
    sequence: int
    open_requests: int = 0

    def __attrs_post_init__(self) -> None:
        _check_int("sender_rank", self.sender_rank, 0, 2**32 - 1)
        _check_int("sequence", self.sequence, 0, _U64_MAX)
        _check_int("open_requests", self.open_requests, 0, MAX_OPEN_REQUESTS)


@attrs.frozen
class Done:
    """Receiver -> sender: every byte landed in the receiver's blocks (checksum compared
    when one was asked for) and its side of the transfer completed. The sender's outcome is
    success only on this word."""

    KIND: ClassVar[MessageKind] = MessageKind.DONE
    request_id: str

    def __attrs_post_init__(self) -> None:
        _check_text("request_id", self.request_id, 1, MAX_REQUEST_ID_BYTES)


ControlMessage: TypeAlias = Advertise | Accept | Cancel | Fail | Heartbeat | Done


def encode(msg: ControlMessage) -> bytes:
    """The bytes of ``msg``; ``decode(encode(msg)) == msg`` for every valid message."""
    if isinstance(msg, Advertise):
        rid = msg.request_id.encode("utf-8")
        body = _ADVERTISE.pack(
            msg.block_count, msg.total_bytes, msg.layout_fingerprint, msg.data_tag,
            msg.num_chunks, FLAG_WANT_CHECKSUM if msg.want_checksum else 0, msg.num_tokens,
            len(rid), len(msg.layout),
        ) + rid + msg.layout
    elif isinstance(msg, Accept):
        rid = msg.request_id.encode("utf-8")
        body = _ACCEPT.pack(msg.data_tag, msg.checksum, len(rid), len(msg.metadata)) + rid \
            + msg.metadata
    elif isinstance(msg, Cancel | Fail):
        rid = msg.request_id.encode("utf-8")
        detail = msg.detail.encode("utf-8")
        body = _REASONED.pack(int(msg.reason), len(rid), len(detail)) + rid + detail
    elif isinstance(msg, Heartbeat):
        body = _HEARTBEAT.pack(msg.sender_rank, msg.sequence, msg.open_requests)
    elif isinstance(msg, Done):
        rid = msg.request_id.encode("utf-8")
        body = _DONE.pack(len(rid)) + rid
    else:
        raise TypeError(f"encode() takes a control message, not {type(msg).__name__}")
    return _HEADER.pack(MAGIC, WIRE_VERSION, int(msg.KIND), len(body)) + body


class _Reader:
    """Sequential reads from a body that raise ``TruncatedMessageError`` past its end."""

    def __init__(self, body: memoryview, whole: bytes) -> None:
        self._body = body
        self._offset = 0
        self._whole = whole

    def fixed(self, layout: struct.Struct) -> tuple[int, ...]:
        end = self._offset + layout.size
        if end > len(self._body):
            raise TruncatedMessageError(HEADER_SIZE + end, HEADER_SIZE + len(self._body),
                                        self._whole)
        values = layout.unpack_from(self._body, self._offset)
        self._offset = end
        return values

    def text(self, field: str, size: int) -> str:
        try:
            return self.raw(size).decode("utf-8")
        except UnicodeDecodeError:
            raise BadEncodingError(field, self._whole) from None

    def raw(self, size: int) -> bytes:
        end = self._offset + size
        if end > len(self._body):
            raise TruncatedMessageError(HEADER_SIZE + end, HEADER_SIZE + len(self._body),
                                        self._whole)
        raw = bytes(self._body[self._offset:end])
        self._offset = end
        return raw

    def finish(self) -> None:
        extra = len(self._body) - self._offset
        if extra:
            raise TrailingBytesError(extra, self._whole)


def _reason(code: int, whole: bytes) -> FailReason:
    try:
        return FailReason(code)
    except ValueError:
        raise FieldRangeError("reason", code, "a known FailReason code", whole) from None


def _decode_body(kind: MessageKind, reader: _Reader, whole: bytes) -> ControlMessage:
    if kind is MessageKind.ADVERTISE:
        (block_count, total_bytes, fingerprint, data_tag, num_chunks, flags, num_tokens,
         rid_len, layout_len) = reader.fixed(_ADVERTISE)
        if flags & ~_KNOWN_FLAGS:
            raise FieldRangeError("flags", flags, f"only known flag bits ({_KNOWN_FLAGS:#x})",
                                  whole)
        rid = reader.text("request_id", rid_len)
        layout = reader.raw(layout_len)
        reader.finish()
        return Advertise(rid, block_count, total_bytes, fingerprint, data_tag, num_chunks,
                         bool(flags & FLAG_WANT_CHECKSUM), num_tokens, layout)
    if kind is MessageKind.ACCEPT:
        data_tag, checksum, rid_len, metadata_len = reader.fixed(_ACCEPT)
        rid = reader.text("request_id", rid_len)
        metadata = reader.raw(metadata_len)
        reader.finish()
        return Accept(rid, data_tag, checksum, metadata)
    if kind is MessageKind.CANCEL or kind is MessageKind.FAIL:
        code, rid_len, detail_len = reader.fixed(_REASONED)
        rid = reader.text("request_id", rid_len)
        detail = reader.text("detail", detail_len)
        reader.finish()
        cls = Cancel if kind is MessageKind.CANCEL else Fail
        return cls(rid, _reason(code, whole), detail)
    if kind is MessageKind.HEARTBEAT:
        sender_rank, sequence, open_requests = reader.fixed(_HEARTBEAT)
        reader.finish()
        return Heartbeat(sender_rank, sequence, open_requests)
    (rid_len,) = reader.fixed(_DONE)
    rid = reader.text("request_id", rid_len)
    reader.finish()
    return Done(rid)


def _as_view(data: bytes | bytearray | memoryview) -> memoryview:
    try:
        return memoryview(data).cast("B")
    except (TypeError, ValueError):
        raise ProtocolError(f"expected bytes, got {type(data).__name__}") from None


def _header_at(view: memoryview, offset: int, *,
               exact: bool = False) -> tuple[MessageKind, int, bytes]:
    """The kind and body length of the message that starts at ``offset`` (its body is
    complete in ``view``; ``exact``: and ends where ``view`` does), and its first bytes for
    errors."""
    whole = bytes(view[offset:offset + 64])
    available = len(view) - offset - HEADER_SIZE
    if available < 0:
        raise TruncatedMessageError(HEADER_SIZE, len(view) - offset, whole)
    magic, version, kind_code, body_len = _HEADER.unpack_from(view, offset)
    if magic != MAGIC:
        raise BadMagicError(magic, whole)
    if version != WIRE_VERSION:
        raise UnsupportedVersionError(version, WIRE_VERSION, whole)
    try:
        kind = MessageKind(kind_code)
    except ValueError:
        raise UnknownKindError(kind_code, whole) from None
    if available < body_len:
        raise TruncatedMessageError(HEADER_SIZE + body_len, HEADER_SIZE + available, whole)
    if exact and available > body_len:
        raise TrailingBytesError(available - body_len, whole)
    return kind, body_len, whole


def _body_at(kind: MessageKind, view: memoryview, start: int, body_len: int,
             whole: bytes) -> ControlMessage:
    reader = _Reader(view[start:start + body_len], whole)
    try:
        return _decode_body(kind, reader, whole)
    except ProtocolError as exc:
        if not exc.data:
            exc.data = whole  # errors raised by message constructors lack the input
        raise


def decode(data: bytes | bytearray | memoryview) -> ControlMessage:
    """Parse one control message. Raises a ``ProtocolError`` subclass, and no other
    exception, for any input that is not exactly one valid message."""
    view = _as_view(data)
    kind, body_len, whole = _header_at(view, 0, exact=True)
    return _body_at(kind, view, HEADER_SIZE, body_len, whole)


def decode_frame(
    data: bytes | bytearray | memoryview,
) -> tuple[list[ControlMessage], list[ProtocolError]]:
    """Parse a frame (one or more messages back to back): the valid messages in order, and
    a ``ProtocolError`` per malformed one. A message whose header is sound but whose body is
    not is skipped (its header delimits it); a malformed header ends the frame, since what
    follows it cannot be delimited. Raises nothing for any input; an empty frame is one
    ``TruncatedMessageError``."""
    messages: list[ControlMessage] = []
    errors: list[ProtocolError] = []
    try:
        view = _as_view(data)
    except ProtocolError as exc:
        return messages, [exc]
    offset, size = 0, len(view)
    while True:
        try:
            kind, body_len, whole = _header_at(view, offset)
        except ProtocolError as exc:
            errors.append(exc)
            return messages, errors
        start = offset + HEADER_SIZE
        try:
            messages.append(_body_at(kind, view, start, body_len, whole))
        except ProtocolError as exc:
            errors.append(exc)
        offset = start + body_len
        if offset >= size:
            return messages, errors


def layout_fingerprint(
    num_layers: int,
    block_shape: Sequence[int],
    dtype: object,
    *,
    extra: Sequence[int | str] = (),
) -> int:
    """A stable u64 naming a KV layout: the same arguments give the same value in every
    process, on every machine and Python version (BLAKE2b of a canonical text, not
    ``hash()``). ``dtype`` may be a ``torch.dtype`` or its name (``torch.float16`` and
    ``"float16"`` agree). ``extra`` distinguishes anything else that changes the bytes'
    meaning, e.g. the TP shard ``(tp_rank, tp_size)``."""
    if type(num_layers) is not int or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    dims = tuple(block_shape)
    if not dims or any(type(d) is not int or d < 1 for d in dims):
        raise ValueError(f"block_shape must be positive ints, got {block_shape!r}")
    dtype_name = str(dtype).removeprefix("torch.")
    canonical = "|".join(
        [
            "kvhandoff-layout-v1",
            f"layers={num_layers}",
            "block_shape=" + ",".join(map(str, dims)),
            f"dtype={dtype_name}",
            "extra=" + ",".join(f"{type(x).__name__}:{x}" for x in extra),
        ]
    )
    digest = hashlib.blake2b(canonical.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def validate_advertise(
    advertise: Advertise,
    *,
    request_id: str,
    block_count: int,
    total_bytes: int,
    layout_fingerprint: int,
    num_chunks: int = 1,
    num_tokens: int | None = None,
    block_tokens: int = 0,
) -> Fail | None:
    """The sender's check of a receiver's advertise against its own transfer: ``None`` when
    they agree, else the ``Fail`` message to send back (and whose reason fails the sender's
    own session), naming the first mismatch with both values."""

    def fail(reason: FailReason, what: str, theirs: object, ours: object) -> Fail:
        detail = f"{what}: receiver {theirs}, sender {ours}"
        return Fail(advertise.request_id, reason, detail[:MAX_DETAIL_BYTES])

    if advertise.request_id != request_id:
        return Fail(advertise.request_id, FailReason.UNKNOWN_REQUEST,
                    "advertise names a request the sender is not sending")
    if advertise.layout_fingerprint != layout_fingerprint:
        return fail(FailReason.LAYOUT_MISMATCH, "layout fingerprint",
                    f"{advertise.layout_fingerprint:#018x}", f"{layout_fingerprint:#018x}")
    if advertise.block_count != block_count:
        return fail(FailReason.BLOCK_COUNT_MISMATCH, "block count", advertise.block_count,
                    block_count)
    # An advertise that does not say (0) takes every slot of every block. Checked before
    # the bytes, which follow from the count (only the valid slots move): name the cause.
    theirs = advertise.num_tokens or advertise.block_count * block_tokens
    if num_tokens is not None and theirs != num_tokens:
        return fail(FailReason.SIZE_MISMATCH, "num tokens", theirs, num_tokens)
    if advertise.total_bytes != total_bytes:
        return fail(FailReason.SIZE_MISMATCH, "total bytes", advertise.total_bytes, total_bytes)
    if advertise.num_chunks != num_chunks:
        return fail(FailReason.CHUNK_MISMATCH, "chunks", advertise.num_chunks, num_chunks)
    return None
