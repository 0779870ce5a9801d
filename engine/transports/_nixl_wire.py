"""NIXL's wire: the notifications ``NixlTransport`` sends, and the cutting of two region lists
into one WRITE's descriptor pairs.

Theory of operation. NIXL carries one kind of message between agents besides the WRITE
itself: a notification, an opaque byte string delivered in order from one agent to another
(a WRITE's own notification after its data). ``NixlTransport`` builds its two-sided contract
from seven kinds of them (``_nixl.py`` says when each is sent); this module is their format,
and nothing here touches NIXL.

Every notification starts with a 6-byte header ``<4sBB``: the magic ``b"KVNX"``, the version
(``VERSION``, 1) and the kind. What follows depends on the kind; all integers are
little-endian (``struct``, never pickle):

====================  =========================================  ==============================
kind                  after the header                           sent by
====================  =========================================  ==============================
CONTROL (1)           the engine's control payload, as is        either side
ADVERTISE (2)         ``<IQQIi`` tag, advertisement id, nbytes,  the receiver, per posted
                      descriptor count, device id; then count    receive
                      ``u64`` addresses, then count ``u64``
                      lengths
DONE (3)              ``<IQ`` tag, advertisement id              the sender, as its WRITE's own
                                                                 notification
REFUSE (4)            ``<IQB`` tag, advertisement id, reason     the sender (it will never
                      (``REFUSE_RETRACTED``, ``REFUSE_SIZE``,    write there)
                      ``REFUSE_FAILED``)
RETRACT (5)           ``<IQ`` tag, advertisement id              the receiver (drop it, please)
PING (6)              nothing                                    either side (the probe)
REGISTERED (7)        NIXL partial agent metadata, as is         either side, before the
                                                                 ADVERTISE that needs it
====================  =========================================  ==============================

``decode_notification`` checks everything before anything is used and raises only
``ProtocolError`` subclasses, whatever the bytes (the transport drops such a message and
counts it): the magic and version, a known kind, the exact length for the fixed kinds, a data
tag in ``1..2**31 - 1`` (tag 0 is the control channel's), a known refusal reason, and for an
ADVERTISE 1 to ``MAX_DESCRIPTORS`` descriptors of 1 byte to under 1 TiB each (so their
``uint64`` sum cannot wrap) adding up to its ``nbytes``. A new field or kind is a new
version: a peer of another version is refused, never half-understood.

Descriptor cutting. A WRITE pairs local descriptor ``i`` with remote descriptor ``i``, of one
length: ``_regions.common_cut`` (shared with MPI's one-copy path) cuts the sender's regions
and the receiver's advertised ones (one total length, laid out differently: blocks of other
sizes, or a buffer against blocks) at the union of their boundaries.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from kvhandoff.engine.transports.errors import (
    BadMagicError,
    FieldRangeError,
    TrailingBytesError,
    TruncatedMessageError,
    UnknownKindError,
    UnsupportedVersionError,
)

__all__ = [
    "KIND_ADVERTISE",
    "KIND_CONTROL",
    "KIND_DONE",
    "KIND_PING",
    "KIND_REFUSE",
    "KIND_REGISTERED",
    "KIND_RETRACT",
    "MAGIC",
    "MAX_DESCRIPTORS",
    "REFUSE_FAILED",
    "REFUSE_REASONS",
    "REFUSE_RETRACTED",
    "REFUSE_SIZE",
    "VERSION",
    "decode_notification",
    "encode_notification",
]

MAGIC = b"KVNX"
VERSION = 1
_HEADER = struct.Struct("<4sBB")
KIND_CONTROL = 1
KIND_ADVERTISE = 2
KIND_DONE = 3
KIND_REFUSE = 4
KIND_RETRACT = 5
KIND_PING = 6
KIND_REGISTERED = 7
_ADVERTISE = struct.Struct("<IQQIi")  # tag, advertisement id, nbytes, descriptors, device id
_REF = struct.Struct("<IQ")  # tag, advertisement id (DONE, RETRACT)
_REFUSE = struct.Struct("<IQB")  # tag, advertisement id, reason
REFUSE_RETRACTED = 1
REFUSE_SIZE = 2
REFUSE_FAILED = 3
#: What a REFUSE says, by its reason code (the receive fails with this text).
REFUSE_REASONS = {
    REFUSE_RETRACTED: "cancelled",
    REFUSE_SIZE: "size mismatch",
    REFUSE_FAILED: "the sender's WRITE failed",
}
#: The most descriptors one advertisement may carry (16 bytes each on the wire).
MAX_DESCRIPTORS = 1 << 20
_MAX_LENGTH = 1 << 40
_MAX_TAG = 2**31 - 1


def encode_notification(kind: int, *fields: Any, body: bytes = b"") -> bytes:
    """The bytes of one notification: header, the kind's fixed fields, then ``body``."""
    head = _HEADER.pack(MAGIC, VERSION, kind)
    if kind == KIND_ADVERTISE:
        return head + _ADVERTISE.pack(*fields) + body
    if kind in (KIND_DONE, KIND_RETRACT):
        return head + _REF.pack(*fields)
    if kind == KIND_REFUSE:
        return head + _REFUSE.pack(*fields)
    if kind in (KIND_CONTROL, KIND_REGISTERED, KIND_PING):
        return head + body
    raise ValueError(f"unknown notification kind {kind}")


def _fixed(struct_: struct.Struct, data: bytes, exact: bool) -> tuple[Any, ...]:
    need = _HEADER.size + struct_.size
    if len(data) < need:
        raise TruncatedMessageError(need, len(data), data)
    if exact and len(data) > need:
        raise TrailingBytesError(len(data) - need, data)
    return struct_.unpack_from(data, _HEADER.size)


def decode_notification(data: bytes) -> tuple[int, tuple[Any, ...]]:
    """``(kind, fields)`` of one notification; raises only ``ProtocolError`` subclasses.

    ADVERTISE fields are ``(tag, adv_id, nbytes, device, addresses, lengths)`` with the two
    arrays ``uint64``; REFUSE ``(tag, adv_id, reason)``; DONE and RETRACT ``(tag, adv_id)``;
    CONTROL and REGISTERED ``(body,)``; PING ``()``."""
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise TruncatedMessageError(_HEADER.size, len(data), data)
    magic, version, kind = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BadMagicError(magic, data)
    if version != VERSION:
        raise UnsupportedVersionError(version, VERSION, data)
    if kind in (KIND_CONTROL, KIND_REGISTERED):
        return kind, (data[_HEADER.size:],)
    if kind == KIND_PING:
        if len(data) > _HEADER.size:
            raise TrailingBytesError(len(data) - _HEADER.size, data)
        return kind, ()
    if kind in (KIND_DONE, KIND_RETRACT):
        tag, adv_id = _fixed(_REF, data, exact=True)
        _check_tag(tag, data)
        return kind, (tag, adv_id)
    if kind == KIND_REFUSE:
        tag, adv_id, reason = _fixed(_REFUSE, data, exact=True)
        _check_tag(tag, data)
        if reason not in REFUSE_REASONS:
            raise FieldRangeError("reason", reason, f"one of {sorted(REFUSE_REASONS)}", data)
        return kind, (tag, adv_id, reason)
    if kind == KIND_ADVERTISE:
        tag, adv_id, nbytes, count, device = _fixed(_ADVERTISE, data, exact=False)
        _check_tag(tag, data)
        if not 1 <= count <= MAX_DESCRIPTORS:
            raise FieldRangeError("descriptors", count, f"1..{MAX_DESCRIPTORS}", data)
        if device < 0:
            raise FieldRangeError("device", device, ">= 0", data)
        start = _HEADER.size + _ADVERTISE.size
        need = start + 16 * count
        if len(data) < need:
            raise TruncatedMessageError(need, len(data), data)
        if len(data) > need:
            raise TrailingBytesError(len(data) - need, data)
        pairs = np.frombuffer(data, dtype="<u8", count=2 * count, offset=start)
        addresses = pairs[:count].astype(np.uint64)
        lengths = pairs[count:].astype(np.uint64)
        if int(lengths.min()) == 0 or int(lengths.max()) >= _MAX_LENGTH:
            raise FieldRangeError("lengths", int(lengths.max()),
                                  f"every descriptor 1..{_MAX_LENGTH - 1} bytes", data)
        # At most 2**20 descriptors below 2**40 bytes each: the uint64 sum cannot wrap.
        if int(lengths.sum()) != nbytes or nbytes == 0:
            raise FieldRangeError("nbytes", nbytes, "the sum of the descriptor lengths", data)
        return kind, (tag, adv_id, nbytes, device, addresses, lengths)
    raise UnknownKindError(kind, data)


def _check_tag(tag: int, data: bytes) -> None:
    if not 1 <= tag <= _MAX_TAG:
        raise FieldRangeError("tag", tag, f"1..{_MAX_TAG}", data)
