"""The cross-memory pieces of MPITransport without MPI: the descriptor and ack codecs refuse
malformed bytes with ``DescriptorError`` (whatever the input), ``segments`` cuts two region
lists at their common boundaries, and ``read`` copies scattered regions (of this process,
through ``process_vm_readv`` on its own pid) into scattered regions, byte for byte, more
than ``IOV_MAX`` segments at a time."""

from __future__ import annotations

import errno
import os
import struct

import numpy as np
import pytest
import torch
from kvhandoff.engine.transports import _cma
from kvhandoff.engine.transports._regions import block_regions
from kvhandoff.engine.transports.errors import CrossMemoryError, DescriptorError

needs_cma = pytest.mark.skipif(_cma.available() is not None,
                               reason=f"no cross-memory attach: {_cma.available()}")


def _descriptor(count: int = 3) -> bytes:
    addresses = np.arange(1, count + 1, dtype=np.uint64) * np.uint64(4096)
    lengths = np.full(count, 100, dtype=np.uint64)
    return _cma.encode_descriptor(7, 1234, addresses, lengths)


def test_descriptor_round_trip() -> None:
    decoded = _cma.decode_descriptor(_descriptor())
    assert (decoded.op_id, decoded.pid, decoded.nbytes) == (7, 1234, 300)
    assert decoded.addresses.tolist() == [4096, 8192, 12288]
    assert decoded.lengths.tolist() == [100, 100, 100]


def _patched(data: bytes, **fields: int) -> bytes:
    """``data`` with header fields replaced (magic, version, flags, op, pid, nbytes, count)."""
    names = ["magic", "version", "flags", "op", "pid", "nbytes", "count"]
    header = list(struct.unpack_from("<4sHHQqQQ", data))
    for name, value in fields.items():
        header[names.index(name)] = value
    return struct.pack("<4sHHQqQQ", *header) + data[struct.calcsize("<4sHHQqQQ"):]


@pytest.mark.parametrize("bad", [
    b"",
    b"KVCM",
    _descriptor()[:-1],  # one byte short of its arrays
    _descriptor() + b"\0",  # trailing byte
    b"XXXX" + _descriptor()[4:],
    _patched(_descriptor(), version=2),
    _patched(_descriptor(), flags=1),
    _patched(_descriptor(), pid=0),
    _patched(_descriptor(), count=0),
    _patched(_descriptor(), count=4),  # more regions than the bytes hold
    _patched(_descriptor(), nbytes=301),  # lengths do not sum to nbytes
    _patched(_descriptor(), nbytes=_cma.MAX_NBYTES + 1),
    _cma.encode_descriptor(1, 1, np.array([1 << 12], np.uint64), np.array([0], np.uint64)),
    _cma.encode_descriptor(1, 1, np.array([0], np.uint64), np.array([8], np.uint64)),
    _cma.encode_descriptor(1, 1, np.array([2**64 - 4], np.uint64), np.array([8], np.uint64)),
])
def test_malformed_descriptor_is_refused_typed(bad: bytes) -> None:
    with pytest.raises(DescriptorError) as info:
        _cma.decode_descriptor(bad)
    assert info.value.data == bad[:64]


def test_random_bytes_never_raise_anything_but_descriptor_error() -> None:
    rng = np.random.default_rng(0)
    good = _descriptor(4)
    for _ in range(500):
        data = bytearray(good)
        for index in rng.integers(0, len(data), rng.integers(1, 4)):
            data[index] = int(rng.integers(0, 256))
        try:
            decoded = _cma.decode_descriptor(bytes(data))
        except DescriptorError:
            continue
        assert int(decoded.lengths.sum()) == decoded.nbytes  # accepted means consistent


def test_peek_op_id_reads_a_sound_header_only() -> None:
    assert _cma.peek_op_id(_patched(_descriptor(), nbytes=301)) == 7
    assert _cma.peek_op_id(b"XXXX" + _descriptor()[4:]) is None
    assert _cma.peek_op_id(b"KVCM") is None


def test_ack_round_trip_and_refusal() -> None:
    assert _cma.decode_ack(_cma.encode_ack(5, None)) == (5, None)
    assert _cma.decode_ack(_cma.encode_ack(6, "size mismatch: x")) == (6, "size mismatch: x")
    for bad in (b"", b"KVCA", _cma.encode_ack(5, None) + b"x",
                b"KVCX" + _cma.encode_ack(5, None)[4:],
                _cma.encode_ack(5, "x" * 5000) + b"y"):
        with pytest.raises(DescriptorError):
            _cma.decode_ack(bad)


def test_segments_cut_both_lists_at_common_boundaries() -> None:
    local, remote = _cma.segments(
        np.array([1000, 5000], np.uint64), np.array([30, 10], np.uint64),
        np.array([100, 200, 300], np.uint64), np.array([10, 25, 5], np.uint64))
    # Boundaries 30, 40 (local) and 10, 35, 40 (remote): segments end at 10, 30, 35, 40.
    assert local.tolist() == [[1000, 10], [1010, 20], [5000, 5], [5005, 5]]
    assert remote.tolist() == [[100, 10], [200, 20], [220, 5], [300, 5]]


@needs_cma
def test_read_copies_scattered_regions_byte_for_byte() -> None:
    # 2500 scattered 64 B regions into K/V-interleaved regions: more than IOV_MAX per call.
    gen = torch.Generator().manual_seed(1)
    src = [torch.randint(0, 256, (4000, 64), dtype=torch.uint8, generator=gen)
           for _ in range(2)]
    ids = torch.randperm(4000, generator=gen)[:1250].tolist()
    kv = torch.zeros(1300, 2, 64, dtype=torch.uint8)
    dst_ids = list(range(20, 1270))
    theirs = block_regions(src, ids)
    mine = block_regions([kv[:, 0], kv[:, 1]], dst_ids)
    assert len(theirs) > _cma.IOV_MAX
    local, remote = _cma.segments(mine.addresses, mine.lengths, theirs.addresses,
                                  theirs.lengths)
    _cma.read(os.getpid(), local, remote)
    assert torch.equal(kv[dst_ids, 0], src[0][ids]) and torch.equal(kv[dst_ids, 1], src[1][ids])
    assert not kv[:20].any() and not kv[1270:].any()


@needs_cma
def test_read_of_unmapped_memory_is_typed() -> None:
    out = np.zeros(8, dtype=np.uint8)
    local = np.array([[out.ctypes.data, 8]], np.uint64)
    remote = np.array([[8, 8]], np.uint64)  # the zero page is never mapped
    with pytest.raises(CrossMemoryError) as info:
        _cma.read(os.getpid(), local, remote)
    assert info.value.errno == errno.EFAULT and info.value.pid == os.getpid()
    assert "use_cma=False" in str(info.value)


@needs_cma
def test_read_from_an_exited_process_is_typed() -> None:
    # A sender that died: its pid is gone (reaped), so the kernel answers ESRCH.
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    out = np.zeros(8, dtype=np.uint8)
    local = np.array([[out.ctypes.data, 8]], np.uint64)
    remote = np.array([[out.ctypes.data, 8]], np.uint64)
    with pytest.raises(CrossMemoryError) as info:
        _cma.read(child, local, remote)
    assert info.value.errno == errno.ESRCH and info.value.done == 0
