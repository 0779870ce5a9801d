"""block_regions / Regions: the region form's byte stream equals the packed layout."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from kvhandoff import cuda_ext
from kvhandoff.engine.transports import (
    InvalidBufferError,
    LoopbackTransport,
    Regions,
    RegionsUnsupportedError,
    Transport,
    block_regions,
    loopback_group,
)


def _read(regions: Regions) -> bytes:
    """The regions' bytes back to back, read through their raw addresses."""
    return b"".join(ctypes.string_at(int(a), int(n))
                    for a, n in zip(regions.addresses, regions.lengths, strict=True))


def _layers(num_blocks: int = 10, count: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(-100, 100, (num_blocks, 4, 2, 3), generator=gen).to(torch.float16)
            for _ in range(count)]


@pytest.mark.parametrize("ids", [[0, 1, 2, 3], [5, 2, 7, 8, 9, 0], [9], [3, 3, 4]])
def test_regions_carry_the_packed_bytes(ids: list[int]) -> None:
    layers = _layers()
    regions = block_regions(layers, ids)
    packed = torch.empty(cuda_ext.packed_nbytes(layers, len(ids)), dtype=torch.uint8)
    cuda_ext.gather_ref(layers, ids, packed)
    assert regions.nbytes == packed.numel()
    assert _read(regions) == packed.numpy().tobytes()


def test_consecutive_ids_collapse_into_one_region_per_tensor() -> None:
    layers = _layers()
    assert len(block_regions(layers, [2, 3, 4, 5])) == len(layers)
    assert len(block_regions(layers, [2, 3, 7, 8])) == 2 * len(layers)


def test_interleaved_blocks_are_one_region_each() -> None:
    # [num_blocks, 2, ...] holds K and V of a block side by side: K's blocks are not adjacent.
    both = torch.arange(10 * 2 * 6, dtype=torch.float32).reshape(10, 2, 6)
    keys, values = both[:, 0], both[:, 1]
    regions = block_regions([keys, values], [1, 2, 3])
    assert len(regions) == 6
    expected = torch.cat([keys[1:4].reshape(-1), values[1:4].reshape(-1)])
    assert _read(regions) == expected.numpy().tobytes()


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 6])
def test_split_keeps_the_stream_and_cuts_equal_parts(parts: int) -> None:
    layers = _layers(count=6)
    regions = block_regions(layers, [4, 5, 0, 9])
    pieces = regions.split(parts)
    assert [p.nbytes for p in pieces] == [regions.nbytes // parts] * parts
    assert b"".join(_read(p) for p in pieces) == _read(regions)


def test_split_refuses_unequal_parts() -> None:
    regions = block_regions(_layers(), [1])
    with pytest.raises(ValueError, match="equal parts"):
        regions.split(5)


@pytest.mark.parametrize("ids", [[10], [-1], []])
def test_bad_ids_raise_before_anything(ids: list[int]) -> None:
    with pytest.raises(InvalidBufferError):
        block_regions(_layers(), ids)


def test_non_contiguous_blocks_are_refused() -> None:
    strided = torch.zeros(10, 4, 6)[:, :, ::2]
    with pytest.raises(InvalidBufferError, match="contiguous"):
        block_regions([strided], [0])


class _BuffersOnly(LoopbackTransport):
    """A transport that keeps the base class's region form: buffers only."""

    moves_regions = False
    post_send_regions = Transport.post_send_regions
    post_recv_regions = Transport.post_recv_regions


def test_a_transport_without_regions_says_so() -> None:
    a = _BuffersOnly(loopback_group(2)[0]._hub, 0)
    regions = block_regions(_layers(), [0])
    assert a.moves_regions is False
    with pytest.raises(RegionsUnsupportedError, match="gather"):
        a.post_send_regions(regions, 1, 1)
    assert regions.addresses.dtype == np.uint64
