"""The wire of NixlTransport without NIXL: its notifications round-trip, malformed bytes raise
only ``ProtocolError`` subclasses (whatever the input), and ``equal_pieces`` cuts two region
lists so that each piece pair moves the same bytes of one byte stream."""

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


@pytest.mark.parametrize("seed", range(5))
def test_equal_pieces_carry_the_same_byte_stream(seed: int) -> None:
    rng = np.random.default_rng(seed)
    total = 4096
    memory = rng.integers(0, 256, size=3 * total, dtype=np.uint8)

    def random_regions(base: int) -> tuple[np.ndarray, np.ndarray]:
        cuts = np.sort(rng.choice(np.arange(1, total), size=rng.integers(0, 12), replace=False))
        lengths = np.diff(np.concatenate(([0], cuts, [total]))).astype(np.uint64)
        gaps = rng.integers(0, 8, size=len(lengths))
        starts = base + np.cumsum(np.concatenate(([0], (lengths + gaps)[:-1])))
        return starts.astype(np.uint64), lengths

    local_addresses, local_lengths = random_regions(0)
    remote_addresses, remote_lengths = random_regions(total + 100)
    local, remote, pieces = wire.equal_pieces(local_addresses, local_lengths,
                                               remote_addresses, remote_lengths)
    assert int(pieces.sum()) == total and (pieces > 0).all()
    out = memory.copy()
    for src, dst, n in zip(local.tolist(), remote.tolist(), pieces.tolist(), strict=True):
        out[dst:dst + n] = memory[src:src + n]
    sent = np.concatenate([memory[a:a + n] for a, n in zip(
        local_addresses.tolist(), local_lengths.tolist(), strict=True)])
    landed = np.concatenate([out[a:a + n] for a, n in zip(
        remote_addresses.tolist(), remote_lengths.tolist(), strict=True)])
    assert np.array_equal(sent, landed)
