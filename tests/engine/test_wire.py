"""The control-message wire format: round trips, typed rejection of every malformed input
(including a hypothesis fuzz), the layout fingerprint and the handshake check."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvhandoff.engine import KVLayout
from kvhandoff.engine import _wire as wire
from kvhandoff.engine._wire import (
    Accept,
    Advertise,
    Cancel,
    Done,
    Fail,
    FailReason,
    Heartbeat,
    decode,
    encode,
    layout_fingerprint,
    validate_advertise,
)
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

FP = layout_fingerprint(32, (16, 8, 128), torch.float16)

SAMPLES = [
    Advertise("req-1", 4, 4 * 65536, FP, 17),
    Advertise("é-長い-id", 2**24, 2**40, 2**64 - 1, 2**31 - 64, 64),
    Accept("req-1", 17),
    Accept("req-1", 17, 2**32 - 1),
    Advertise("req-5", 4, 4 * 65536, FP, 17, want_checksum=True),
    # The widest: every bound at once (tokens, a maximal layout field, a maximal id).
    Advertise("r" * 256, 2**24, 2**40, 2**64 - 1, 2**31 - 64, 64, True, 2**40,
              b"\xff" * wire.MAX_LAYOUT_FIELD_BYTES),
    Advertise("req-2", 3, 3 * 4096, FP, 9, 1, False, 37,
              KVLayout(32, 16, 8, 128, torch.float16, extra=("q4", 7)).encode()),
    Accept("req-1", 17, 0, b"\x00opaque\x80 bytes"),
    Accept("r" * 256, 2**31 - 1, 2**32 - 1, b"m" * wire.MAX_METADATA_BYTES),
    Cancel("req-1"),
    Cancel("req-2", FailReason.TIMEOUT, "queue deadline"),
    Fail("req-3", FailReason.SIZE_MISMATCH, "total bytes: receiver 10, sender 20"),
    Fail("r" * 256, FailReason.PEER_LOST, "d" * 256),
    Heartbeat(3, 2**64 - 1, 12),
    Heartbeat(0, 0),
    Done("req-4"),
]


def _raw(kind: int, body: bytes, *, magic: bytes = wire.MAGIC,
         version: int = wire.WIRE_VERSION) -> bytes:
    return struct.pack("!4sBBH", magic, version, kind, len(body)) + body


def _advertise_raw(block_count: int, total_bytes: int, *, tag: int = 5, chunks: int = 1,
                   rid: bytes = b"req", flags: int = 0, tokens: int = 0,
                   layout: bytes = b"") -> bytes:
    body = struct.pack("!IQQIIBQHH", block_count, total_bytes, 99, tag, chunks, flags,
                       tokens, len(rid), len(layout)) + rid + layout
    return _raw(wire.MessageKind.ADVERTISE, body)


def _accept_raw(metadata: bytes, *, tag: int = 5, rid: bytes = b"req") -> bytes:
    body = struct.pack("!IIHH", tag, 0, len(rid), len(metadata)) + rid + metadata
    return _raw(wire.MessageKind.ACCEPT, body)


def test_wire_largest_message_fits_one_control_message() -> None:
    """The bound every transport's control channel is sized by holds for the new fields."""
    from kvhandoff.engine.layout import MAX_LAYOUT_BYTES
    from kvhandoff.engine.transports import MAX_CONTROL_BYTES

    assert max(len(encode(m)) for m in SAMPLES) == wire.MAX_MESSAGE_BYTES
    assert wire.MAX_MESSAGE_BYTES <= MAX_CONTROL_BYTES
    assert MAX_LAYOUT_BYTES <= wire.MAX_LAYOUT_FIELD_BYTES


def test_wire_frame_of_several_messages_decodes_in_order() -> None:
    frame = b"".join(encode(m) for m in SAMPLES)
    assert wire.decode_frame(frame) == (list(SAMPLES), [])
    assert wire.decode_frame(encode(SAMPLES[0])) == ([SAMPLES[0]], [])
    with pytest.raises(TrailingBytesError):
        decode(frame)  # ``decode`` takes exactly one message


@pytest.mark.parametrize("junk", [b"K", b"KVHC\x04\x63\x00\x00", b"\x00" * 20,
                                  _raw(wire.MessageKind.DONE, b"\x00", version=3)])
def test_wire_frame_stops_at_the_first_malformed_header(junk: bytes) -> None:
    good = [SAMPLES[0], SAMPLES[-1]]
    frame = b"".join(encode(m) for m in good) + junk + encode(SAMPLES[1])
    messages, errors = wire.decode_frame(frame)
    assert messages == good  # nothing after a header that cannot be trusted
    assert len(errors) == 1 and isinstance(errors[0], ProtocolError)


def test_wire_frame_skips_a_message_whose_body_alone_is_malformed() -> None:
    """A sound header delimits its message: a bad body (a field out of range, bad UTF-8,
    bytes left over inside it) drops that message only."""
    bad_bodies = [_raw(wire.MessageKind.DONE, struct.pack("!H", 2) + b"\xff\xfe"),
                  _raw(wire.MessageKind.DONE, struct.pack("!H", 1) + b"rX")]
    for bad in bad_bodies:
        frame = encode(SAMPLES[0]) + bad + encode(SAMPLES[1])
        messages, errors = wire.decode_frame(frame)
        assert messages == [SAMPLES[0], SAMPLES[1]]
        assert len(errors) == 1 and isinstance(errors[0], ProtocolError)
    assert wire.decode_frame(b"")[0] == []
    assert isinstance(wire.decode_frame(b"")[1][0], TruncatedMessageError)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_wire_fuzz_frames_never_raise(data: bytes) -> None:
    for payload in (data, encode(SAMPLES[0]) + data):
        _, errors = wire.decode_frame(payload)
        assert all(isinstance(error, ProtocolError) for error in errors)


def test_wire_version_3_message_is_refused_not_misread() -> None:
    """Version 4 only changed the framing; a version-3 peer is still refused by version."""
    with pytest.raises(UnsupportedVersionError) as info:
        decode(_raw(wire.MessageKind.DONE, struct.pack("!H", 1) + b"r", version=3))
    assert info.value.version == 3


def test_wire_version_2_advertise_is_refused_not_misread() -> None:
    """A version-2 ADVERTISE (no tokens, no layout) from an older engine is refused by
    version, never parsed as version 3's longer fixed part."""
    old = struct.pack("!IQQIIBH", 1, 16, 99, 5, 1, 0, 3) + b"req"
    with pytest.raises(UnsupportedVersionError) as info:
        decode(_raw(wire.MessageKind.ADVERTISE, old, version=2))
    assert info.value.version == 2


def test_wire_all_matches_module_names() -> None:
    for name in wire.__all__:
        assert hasattr(wire, name), name
    defined = {
        name for name, value in vars(wire).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == wire.__name__
    }
    assert defined <= set(wire.__all__), defined - set(wire.__all__)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_wire_round_trip_preserves_message(msg: wire.ControlMessage) -> None:
    data = encode(msg)
    assert len(data) <= wire.MAX_MESSAGE_BYTES
    assert decode(data) == msg
    assert decode(bytearray(data)) == msg
    assert decode(memoryview(data)) == msg


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_wire_every_truncation_is_typed(msg: wire.ControlMessage) -> None:
    data = encode(msg)
    for cut in range(len(data)):
        with pytest.raises(TruncatedMessageError) as info:
            decode(data[:cut])
        assert info.value.available <= cut


def test_wire_trailing_bytes_rejected() -> None:
    with pytest.raises(TrailingBytesError) as info:
        decode(encode(Done("x")) + b"\0\0")
    assert info.value.extra == 2


def test_wire_body_length_lies_are_rejected() -> None:
    # The header says 3 bytes of body but the DONE layout needs 2 + len(rid).
    with pytest.raises(TruncatedMessageError):
        decode(_raw(wire.MessageKind.DONE, struct.pack("!H", 9) + b"x"))
    with pytest.raises(TrailingBytesError):
        decode(_raw(wire.MessageKind.DONE, struct.pack("!H", 1) + b"xy"))


def test_wire_bad_magic_rejected() -> None:
    with pytest.raises(BadMagicError) as info:
        decode(_raw(6, b"\0\1x", magic=b"HTTP"))
    assert info.value.magic == b"HTTP"


def test_wire_wrong_version_rejected() -> None:
    # 1: before the outcome handshake's fields; 2: before the tokens, layout and metadata;
    # 3: a peer that moves whole blocks whatever the count (its total bytes mean another
    # stream than ours).
    for version in (1, 2, 3, wire.WIRE_VERSION + 1):
        data = bytearray(encode(Done("x")))
        data[4] = version
        with pytest.raises(UnsupportedVersionError) as info:
            decode(bytes(data))
        assert (info.value.version, info.value.supported) == (version, wire.WIRE_VERSION)


def test_wire_unknown_advertise_flags_rejected() -> None:
    assert decode(_advertise_raw(1, 16, flags=1)) == Advertise("req", 1, 16, 99, 5, 1, True)
    with pytest.raises(FieldRangeError) as info:
        decode(_advertise_raw(1, 16, flags=2))
    assert info.value.field == "flags"
    with pytest.raises(FieldRangeError):
        Advertise("req", 1, 16, 99, 5, 1, 1)  # type: ignore[arg-type]  # a bool, not an int
    with pytest.raises(FieldRangeError):
        Accept("req", 1, 2**32)


def test_wire_unknown_kind_rejected() -> None:
    with pytest.raises(UnknownKindError) as info:
        decode(_raw(200, b""))
    assert info.value.kind == 200


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (_advertise_raw(2**24 + 1, 2**24 + 1), "block_count"),
        (_advertise_raw(0, 16), "block_count"),
        (_advertise_raw(1, 2**40 + 1), "total_bytes"),
        (_advertise_raw(3, 10), "total_bytes"),  # not a multiple of the block count
        (_advertise_raw(4, 4096, chunks=3), "total_bytes"),  # not a multiple of the chunks
        (_advertise_raw(1, 16, chunks=0), "num_chunks"),
        (_advertise_raw(1, 16, chunks=2**16 + 1), "num_chunks"),
        (_advertise_raw(1, 16, tag=0), "data_tag"),
        (_advertise_raw(1, 16, tag=2**31), "data_tag"),
        (_advertise_raw(1, 16, rid=b""), "request_id"),
        (_advertise_raw(1, 16, rid=b"r" * 257), "request_id"),
        (_advertise_raw(1, 16, tokens=2**40 + 1), "num_tokens"),
        (_advertise_raw(1, 16, layout=b"L" * (wire.MAX_LAYOUT_FIELD_BYTES + 1)), "layout"),
        (_accept_raw(b"m" * (wire.MAX_METADATA_BYTES + 1)), "metadata"),
        (_raw(wire.MessageKind.FAIL, struct.pack("!HHH", 999, 1, 0) + b"r"), "reason"),
        (_raw(wire.MessageKind.FAIL, struct.pack("!HHH", 1, 1, 257) + b"r" + b"d" * 257),
         "detail"),
    ],
)
def test_wire_out_of_range_fields_rejected(raw: bytes, field: str) -> None:
    with pytest.raises(FieldRangeError) as info:
        decode(raw)
    assert info.value.field == field
    assert info.value.data == raw[:64]


def test_wire_bad_utf8_rejected() -> None:
    with pytest.raises(BadEncodingError) as info:
        decode(_raw(wire.MessageKind.DONE, struct.pack("!H", 2) + b"\xff\xfe"))
    assert info.value.field == "request_id"


@pytest.mark.parametrize("value", ["text", 3.5, None, object()])
def test_wire_non_bytes_input_is_protocol_error(value: object) -> None:
    with pytest.raises(ProtocolError):
        decode(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: Advertise("", 1, 16, 0, 1), "request_id"),
        (lambda: Advertise("é" * 129, 1, 16, 0, 1), "request_id"),  # 258 bytes of UTF-8
        (lambda: Advertise("r", True, 16, 0, 1), "block_count"),
        (lambda: Advertise("r", 1, 16, -1, 1), "layout_fingerprint"),
        (lambda: Advertise("r", 1, 16, 0, 2**31 - 1, 2), "data_tag"),  # last chunk's tag
        (lambda: Fail("r", 3, ""), "reason"),  # type: ignore[arg-type]
        (lambda: Heartbeat(-1, 0), "sender_rank"),
        (lambda: Accept(b"r", 1), "request_id"),  # type: ignore[arg-type]
        (lambda: Accept("r", 1, 0, "text"), "metadata"),  # type: ignore[arg-type]
        (lambda: Accept("r", 1, 0, bytearray(b"m")), "metadata"),  # type: ignore[arg-type]
        (lambda: Accept("r", 1, 0, b"m" * (wire.MAX_METADATA_BYTES + 1)), "metadata"),
        (lambda: Advertise("r", 1, 16, 0, 1, 1, False, -1), "num_tokens"),
        (lambda: Advertise("r", 1, 16, 0, 1, 1, False, 1, "layout"),  # type: ignore[arg-type]
         "layout"),
    ],
)
def test_wire_invalid_message_cannot_be_built(make: object, field: str) -> None:
    with pytest.raises(FieldRangeError) as info:
        make()  # type: ignore[operator]
    assert info.value.field == field


def test_wire_lone_surrogate_request_id_is_encoding_error() -> None:
    with pytest.raises(BadEncodingError):
        Done("\ud800")


def test_wire_encode_rejects_non_messages() -> None:
    with pytest.raises(TypeError):
        encode("ADVERTISE")  # type: ignore[arg-type]


def test_wire_fail_reason_labels_are_log_names() -> None:
    assert FailReason.PEER_LOST.label == "peer_lost"
    assert FailReason.SIZE_MISMATCH.label == "size_mismatch"
    assert len({r.label for r in FailReason}) == len(FailReason)


_request_ids = st.text(min_size=1, max_size=64).filter(
    lambda s: 1 <= len(s.encode("utf-8", "surrogatepass")) <= 256
    and not any(0xD800 <= ord(c) <= 0xDFFF for c in s)
)


@st.composite
def _advertises(draw: st.DrawFn) -> Advertise:
    block_count = draw(st.integers(1, 2**12))
    num_chunks = draw(st.integers(1, 64))
    unit = draw(st.integers(1, 2**12))
    return Advertise(
        draw(_request_ids), block_count, block_count * num_chunks * unit,
        draw(st.integers(0, 2**64 - 1)), draw(st.integers(1, 2**31 - 64)), num_chunks,
        draw(st.booleans()), draw(st.integers(0, 2**40)),
        draw(st.binary(max_size=wire.MAX_LAYOUT_FIELD_BYTES)),
    )


_messages = st.one_of(
    _advertises(),
    st.builds(Accept, _request_ids, st.integers(1, 2**31 - 1), st.integers(0, 2**32 - 1),
              st.binary(max_size=wire.MAX_METADATA_BYTES)),
    st.builds(Cancel, _request_ids, st.sampled_from(FailReason), st.text(max_size=40)),
    st.builds(Fail, _request_ids, st.sampled_from(FailReason), st.text(max_size=40)),
    st.builds(Heartbeat, st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1),
              st.integers(0, 2**24)),
    st.builds(Done, _request_ids),
)


def _decode_or_protocol_error(data: bytes) -> None:
    try:
        result = decode(data)
    except ProtocolError:
        return
    # Whatever decodes must be a valid message that encodes back to the same bytes.
    assert encode(result) == data


@settings(max_examples=300, deadline=None)
@given(_messages.filter(lambda m: not isinstance(m, Cancel | Fail) or _valid_detail(m)))
def test_wire_fuzz_round_trip(msg: wire.ControlMessage) -> None:
    assert decode(encode(msg)) == msg


def _valid_detail(msg: Cancel | Fail) -> bool:
    return not any(0xD800 <= ord(c) <= 0xDFFF for c in msg.detail)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_wire_fuzz_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    _decode_or_protocol_error(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_wire_fuzz_random_body_behind_valid_header(body: bytes) -> None:
    for kind in wire.MessageKind:
        _decode_or_protocol_error(_raw(kind, body))


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(SAMPLES),
    st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(-8, 8),
)
def test_wire_fuzz_mutated_messages_only_raise_protocol_error(
    msg: wire.ControlMessage, flips: list[tuple[int, int]], resize: int
) -> None:
    data = bytearray(encode(msg))
    for position, value in flips:
        data[position % len(data)] = value
    if resize < 0:
        del data[resize:]
    else:
        data.extend(bytes(resize))
    _decode_or_protocol_error(bytes(data))


def test_layout_fingerprint_is_stable_across_processes() -> None:
    # A pinned value: the fingerprint is a wire contract between versions and machines.
    assert FP == layout_fingerprint(32, [16, 8, 128], "float16")
    # Another process with another hash seed: a hash()-based value would differ.
    code = "from kvhandoff.engine._wire import layout_fingerprint as f; " \
        "print(f(32, (16, 8, 128), 'float16'))"
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONHASHSEED": seed})
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == FP
    assert FP == 0x38A6802D598353DE


def test_layout_fingerprint_distinguishes_layouts() -> None:
    variants = {
        layout_fingerprint(32, (16, 8, 128), torch.float16),
        layout_fingerprint(31, (16, 8, 128), torch.float16),
        layout_fingerprint(32, (16, 8, 64), torch.float16),
        layout_fingerprint(32, (16, 8, 128), torch.bfloat16),
        layout_fingerprint(32, (16, 8, 128), torch.float16, extra=(0, 2)),
        layout_fingerprint(32, (16, 8, 128), torch.float16, extra=(1, 2)),
        layout_fingerprint(32, (16, 8, 128), torch.float16, extra=("1", 2)),
    }
    assert len(variants) == 7
    assert all(0 <= v < 2**64 for v in variants)


@pytest.mark.parametrize(
    ("layers", "shape"), [(0, (1,)), (2, ()), (2, (4, 0)), (2, (4, 2.0)), (True, (1,))]
)
def test_layout_fingerprint_rejects_bad_layouts(layers: object, shape: tuple[object]) -> None:
    with pytest.raises(ValueError):
        layout_fingerprint(layers, shape, "float16")  # type: ignore[arg-type]


def test_validate_advertise_accepts_matching_transfer() -> None:
    adv = Advertise("req", 8, 8 * 1024, FP, 3, 2)
    assert validate_advertise(adv, request_id="req", block_count=8, total_bytes=8 * 1024,
                              layout_fingerprint=FP, num_chunks=2) is None


def test_validate_advertise_without_a_token_count_means_every_slot() -> None:
    """An advertise that does not say its count (0, e.g. built by hand) takes every slot of
    every block: it matches a sender of whole blocks and is size_mismatch for a partial one."""
    adv = Advertise("req", 8, 8 * 1024, FP, 3, 2)
    assert adv.num_tokens == 0
    common = dict(request_id="req", block_count=8, total_bytes=8 * 1024,
                  layout_fingerprint=FP, num_chunks=2, block_tokens=16)
    assert validate_advertise(adv, num_tokens=128, **common) is None  # type: ignore[arg-type]
    fail = validate_advertise(adv, num_tokens=121, **common)  # type: ignore[arg-type]
    assert fail is not None and fail.reason is FailReason.SIZE_MISMATCH
    assert "num tokens: receiver 128, sender 121" in fail.detail


def test_advertise_with_a_count_carries_the_valid_bytes() -> None:
    """With a count, only the last block's valid slots move: the total need not be a
    multiple of the block count (without one it must be), and a different count is named
    as the cause before the bytes that follow from it."""
    adv = Advertise("req", 3, 35 * 64, FP, 3, 1, False, 35)  # 16 tokens of 64 bytes a block
    assert decode(encode(adv)) == adv
    with pytest.raises(FieldRangeError) as info:
        Advertise("req", 3, 35 * 64, FP, 3)
    assert info.value.field == "total_bytes"
    fail = validate_advertise(adv, request_id="req", block_count=3, total_bytes=40 * 64,
                              layout_fingerprint=FP, num_tokens=40, block_tokens=16)
    assert fail is not None and fail.reason is FailReason.SIZE_MISMATCH
    assert "num tokens: receiver 35, sender 40" in fail.detail


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"request_id": "other"}, FailReason.UNKNOWN_REQUEST),
        ({"layout_fingerprint": FP ^ 1}, FailReason.LAYOUT_MISMATCH),
        ({"block_count": 4}, FailReason.BLOCK_COUNT_MISMATCH),
        ({"total_bytes": 4096}, FailReason.SIZE_MISMATCH),
        ({"num_chunks": 1}, FailReason.CHUNK_MISMATCH),
        ({"num_tokens": 120}, FailReason.SIZE_MISMATCH),
    ],
)
def test_validate_advertise_names_the_mismatch(overrides: dict[str, object],
                                               reason: FailReason) -> None:
    adv = Advertise("req", 8, 8 * 1024, FP, 3, 2, False, 121)
    expected: dict[str, object] = {"request_id": "req", "block_count": 8,
                                   "total_bytes": 8 * 1024, "layout_fingerprint": FP,
                                   "num_chunks": 2, "num_tokens": 121}
    expected.update(overrides)
    fail = validate_advertise(adv, **expected)  # type: ignore[arg-type]
    assert fail is not None
    assert fail.reason is reason
    assert fail.request_id == "req"
    assert decode(encode(fail)) == fail


def test_wire_errors_survive_pickling() -> None:
    import pickle

    with pytest.raises(FieldRangeError) as info:
        decode(_advertise_raw(2**24 + 1, 2**24 + 1))
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is FieldRangeError
    assert (copy.field, copy.value, copy.data, str(copy)) == (
        info.value.field, info.value.value, info.value.data, str(info.value)
    )
