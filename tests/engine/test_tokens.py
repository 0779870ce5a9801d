"""``_tokens``: the last block's valid token slots, as the staged path and the checksum pack
and unpack them, on the torch reference and the compiled backend, agreeing with the region
form (``block_regions(..., tail)``) byte for byte."""

from __future__ import annotations

import ctypes
import os
import shutil
import zlib
from collections.abc import Iterator

import pytest
import torch
from kvhandoff import cuda_ext
from kvhandoff.cuda_ext import _loader
from kvhandoff.engine import BlockPool, KVLayout, _tokens
from kvhandoff.engine._checksum import blocks_checksum, checksum_of_chunks, piece_crc
from kvhandoff.engine.transports import BlockTail, block_regions


@pytest.fixture(params=["torch", "cpp"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the block copies on the torch reference, or on the compiled CPU kernels."""
    if request.param == "cpp":
        from torch.utils.cpp_extension import is_ninja_available

        if shutil.which(os.environ.get("CXX", "c++")) is None or not is_ninja_available():
            pytest.skip("no C++ compiler or ninja: the compiled backend cannot be built here")
        _loader.extension(required=True)
    monkeypatch.setenv(_loader.BACKEND_ENV, request.param)
    assert cuda_ext.backend("cpu") == request.param
    yield request.param


def _pool(order: str, heads: int = 2) -> BlockPool:
    pool = BlockPool.from_layout(KVLayout(2, 4, heads, 3, torch.float16, order=order), 12)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(11)
    for layer in pool.layers:
        layer.copy_(torch.randn(layer.shape, generator=gen).half())
    return pool


def _slots(pool: BlockPool, ids: list[int], valid: int) -> tuple[bytes, bytes]:
    """(the packed stream of ``ids`` with ``valid`` slots of the last block, the bytes of
    the last blocks' other slots), from torch indexing."""
    stream, rest = [], []
    for layer in pool.layers:
        last = layer[ids[-1]]
        cut = (slice(None), slice(0, valid)) if pool.layout.order == "HND" else slice(0, valid)
        other = (slice(None), slice(valid, None)) if pool.layout.order == "HND" \
            else slice(valid, None)
        stream += [layer[ids[:-1]].reshape(-1), last[cut].contiguous().reshape(-1)]
        rest.append(last[other].contiguous().reshape(-1))
    as_bytes = lambda parts: torch.cat(parts).view(torch.uint8).numpy().tobytes()  # noqa: E731
    return as_bytes(stream), as_bytes(rest)


@pytest.mark.parametrize(("order", "heads", "valid", "tail"), [
    ("NHD", 2, 1, BlockTail(1, 1 * 2 * 3 * 2)),
    ("NHD", 2, 3, BlockTail(1, 3 * 2 * 3 * 2)),
    ("HND", 2, 3, BlockTail(2, 3 * 3 * 2, stride=4 * 3 * 2)),
    ("HND", 1, 2, BlockTail(1, 2 * 3 * 2)),  # one head: one prefix, as NHD
    ("NHD", 2, 4, None), ("HND", 2, 4, None),  # the count fills the block: whole blocks
])
def test_token_slots_derive_the_tail_from_the_layout(order: str, heads: int, valid: int,
                                                     tail: BlockTail | None) -> None:
    pool = _pool(order, heads)
    slots = _tokens.TokenSlots(pool.layout, pool.layers)
    assert slots.tail(2 * 4 + valid, 3) == tail
    block = 4 * heads * 3 * 2
    assert slots.left_out(2 * 4 + valid, 3) == (0 if tail is None else block - tail.total)
    # A chunk of every tensor moves the tokens' bytes, whole blocks for a full count.
    assert slots.chunk_nbytes(3, 2 * 4 + valid, 4) == 4 * (2 * 4 + valid) * heads * 3 * 2


@pytest.mark.parametrize("order", ["NHD", "HND"])
@pytest.mark.parametrize("ids", [[3, 4, 5], [9, 0, 6, 7], [2]])
def test_gather_and_scatter_move_only_the_valid_slots(backend: str, order: str,
                                                      ids: list[int]) -> None:
    src, dst = _pool(order), _pool(order)
    for layer in dst.layers:
        layer.fill_(-3.0)
    valid = 3
    tokens = (len(ids) - 1) * 4 + valid
    tail = _tokens.TokenSlots(src.layout, src.layers).tail(tokens, len(ids))
    assert tail is not None
    size = _tokens.packed_nbytes(src.layers, len(ids), tail)
    out = torch.empty(size, dtype=torch.uint8)
    _tokens.gather(src.layers, ids, out, tail)
    stream, _ = _slots(src, ids, valid)
    assert out.numpy().tobytes() == stream
    regions = block_regions(src.layers, ids, tail)  # the region form carries the same bytes
    assert b"".join(ctypes.string_at(int(a), int(n)) for a, n in
                    zip(regions.addresses, regions.lengths, strict=True)) == stream
    _, untouched = _slots(dst, ids, valid)
    _tokens.scatter(out, dst.layers, ids, tail)
    landed, rest = _slots(dst, ids, valid)
    assert landed == stream and rest == untouched


@pytest.mark.parametrize("order", ["NHD", "HND"])
def test_a_buffer_of_another_size_is_refused_before_anything_moves(backend: str,
                                                                   order: str) -> None:
    src, dst = _pool(order), _pool(order)
    tail = _tokens.TokenSlots(src.layout, src.layers).tail(6, 2)
    size = _tokens.packed_nbytes(src.layers, 2, tail)
    before = [layer.clone() for layer in dst.layers]
    for wrong in (size - 2, size + 2, cuda_ext.packed_nbytes(src.layers, 2)):
        with pytest.raises(cuda_ext.RegionSizeMismatchError):
            _tokens.gather(src.layers, [0, 1], torch.zeros(wrong, dtype=torch.uint8), tail)
        with pytest.raises(cuda_ext.RegionSizeMismatchError):
            _tokens.scatter(torch.zeros(wrong, dtype=torch.uint8), dst.layers, [0, 1], tail)
    assert all(torch.equal(a, b) for a, b in zip(before, dst.layers, strict=True))


@pytest.mark.parametrize("order", ["NHD", "HND"])
def test_blocks_checksum_with_a_tail_is_the_crc_of_the_staged_pieces(order: str) -> None:
    """The region side's checksum (read from the blocks) equals the staged side's (fed
    piece by piece), the last piece cut to the tail, for whole and layer-wise chunks."""
    pool = _pool(order)
    ids = [5, 1, 2, 8, 3]
    pieces = [ids[:2], ids[2:]]
    tokens = 4 * 4 + 1
    tail = _tokens.TokenSlots(pool.layout, pool.layers).tail(tokens, len(ids))
    for groups in ([pool.layers], [pool.layers[:2], pool.layers[2:]]):
        crcs = []
        for layers in groups:
            crc = 0
            for index, piece in enumerate(pieces):
                cut = tail if index == len(pieces) - 1 else None
                buf = torch.empty(_tokens.packed_nbytes(layers, len(piece), cut),
                                  dtype=torch.uint8)
                _tokens.gather(layers, piece, buf, cut)
                crc = piece_crc(buf, crc)
            crcs.append(crc)
        assert blocks_checksum(groups, pieces, tail) == checksum_of_chunks(crcs)
        assert blocks_checksum(groups, pieces, tail) != blocks_checksum(groups, pieces)
    stream, _ = _slots(pool, ids, 1)
    assert blocks_checksum([pool.layers], [ids], tail) == zlib.crc32(stream)
