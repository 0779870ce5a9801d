"""The wire of NixlTransport without NIXL: its notifications round-trip, and malformed bytes
raise only ``ProtocolError`` subclasses (whatever the input). Descriptor cutting is
``_regions.common_cut``, tested with the region form."""

from __future__ import annotations

import numpy as np
import pytest
from kvhandoff.engine.transports import _nixl_wire as wire
from kvhandoff.engine.transports.errors import (
    BadMagicError,
    FieldRangeError,
    TrailingBytesError,
    TruncatedMessageError,
    UnknownKindError,
    UnsupportedVersionError,
)


def _advertise(addresses: list[int], lengths: list[int], nbytes: int | None = None) -> bytes:
    body = (np.array(addresses, dtype="<u8").tobytes() + np.array(lengths, dtype="<u8").tobytes())
    total = sum(lengths) if nbytes is None else nbytes
    return wire.encode_notification(wire.KIND_ADVERTISE, 7, 3, total, len(lengths), 0,
                                     body=body)


def test_notifications_round_trip() -> None:
    kind, fields = wire.decode_notification(_advertise([4096, 65536], [100, 28]))
    assert kind == wire.KIND_ADVERTISE
    tag, adv_id, nbytes, device, addresses, lengths = fields
    assert (tag, adv_id, nbytes, device) == (7, 3, 128, 0)
    assert addresses.tolist() == [4096, 65536] and lengths.tolist() == [100, 28]
    for kind, args in [(wire.KIND_DONE, (5, 9)), (wire.KIND_RETRACT, (5, 9)),
                       (wire.KIND_REFUSE, (5, 9, wire.REFUSE_SIZE))]:
        assert wire.decode_notification(wire.encode_notification(kind, *args)) == (kind, args)
    control = wire.encode_notification(wire.KIND_CONTROL, body=b"hello")
    assert wire.decode_notification(control) == (wire.KIND_CONTROL, (b"hello",))


@pytest.mark.parametrize(("data", "error"), [
    (b"KVN", TruncatedMessageError),
    (b"XXXX\x01\x03" + bytes(12), BadMagicError),
    (b"KVNX\x02\x03" + bytes(12), UnsupportedVersionError),
    (b"KVNX\x01\x63", UnknownKindError),
    (wire.encode_notification(wire.KIND_DONE, 1, 2) + b"!", TrailingBytesError),
    (wire.encode_notification(wire.KIND_DONE, 1, 2)[:-1], TruncatedMessageError),
    (wire.encode_notification(wire.KIND_DONE, 0, 2), FieldRangeError),  # tag 0 is control's
    (b"KVNX\x01\x04" + bytes(4) + bytes(8) + b"\x09", FieldRangeError),  # unknown reason
    (_advertise([1, 2], [10, 10], nbytes=21), FieldRangeError),  # lengths do not add up
    (_advertise([1, 2], [10, 0]), FieldRangeError),  # an empty descriptor
    (_advertise([1, 2], [10, 10])[:-1], TruncatedMessageError),
    (_advertise([1, 2], [10, 10]) + b"\0", TrailingBytesError),
    (wire.encode_notification(wire.KIND_PING) + b"\0", TrailingBytesError),
])
def test_bad_notifications_raise_only_protocol_errors(data: bytes, error: type) -> None:
    with pytest.raises(error):
        wire.decode_notification(data)
