"""block_regions / Regions: the region form's byte stream equals the packed layout."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from kvhandoff import cuda_ext
from kvhandoff.engine.transports import (
    BlockTail,
    InvalidBufferError,
    LoopbackTransport,
    Regions,
    RegionsUnsupportedError,
    Transport,
    block_regions,
    buffer_regions,
    loopback_group,
)
from kvhandoff.engine.transports._regions import common_cut


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


def test_tensors_of_different_block_sizes_keep_the_packed_order() -> None:
    small = torch.arange(10 * 6, dtype=torch.float32).reshape(10, 6)
    large = torch.arange(10 * 10, dtype=torch.float32).reshape(10, 10) + 1000
    regions = block_regions([small, large], [4, 5, 1])
    assert regions.nbytes == 3 * 6 * 4 + 3 * 10 * 4
    expected = torch.cat([small[[4, 5, 1]].reshape(-1), large[[4, 5, 1]].reshape(-1)])
    assert _read(regions) == expected.numpy().tobytes()


# --- a partial last block: the tail ---------------------------------------------------------

def _expected_stream(layers: list[torch.Tensor], ids: list[int], cut: slice | tuple[slice, ...],
                     ) -> bytes:
    """Each tensor's blocks before the last, then ``last[cut]``: the packed stream with a
    partial last block, built from torch indexing."""
    parts = []
    for layer in layers:
        parts.append(layer[ids[:-1]].reshape(-1).view(torch.uint8))
        parts.append(layer[ids[-1]][cut].contiguous().reshape(-1).view(torch.uint8))
    return torch.cat(parts).numpy().tobytes()


@pytest.mark.parametrize("ids", [[2, 3, 4, 5], [5, 2, 7, 8, 9, 0], [9], [3, 1]])
@pytest.mark.parametrize("valid", [1, 3])
def test_a_prefix_tail_cuts_each_tensors_last_block(ids: list[int], valid: int) -> None:
    """NHD-like blocks [4 tokens, 2, 3]: the tail is the first ``valid`` token rows; a run of
    consecutive ids keeps one region per tensor, its last one shorter."""
    layers = _layers()
    row = 2 * 3 * 2  # one token row of float16
    regions = block_regions(layers, ids, BlockTail(1, valid * row))
    assert _read(regions) == _expected_stream(layers, ids, slice(0, valid))
    assert regions.nbytes == len(layers) * ((len(ids) - 1) * 4 * row + valid * row)
    assert len(regions) == len(block_regions(layers, ids))


@pytest.mark.parametrize("ids", [[2, 3, 4], [7, 0, 5], [6]])
def test_a_tail_of_several_ranges_takes_each_heads_slots(ids: list[int]) -> None:
    """HND-like blocks [2 heads, 4 tokens, 3]: the tail is 2 ranges, the first ``valid``
    tokens of each head, one extra region per tensor."""
    layers = [torch.randn(10, 2, 4, 3).to(torch.float16) for _ in range(3)]
    row = 3 * 2
    regions = block_regions(layers, ids, BlockTail(2, 3 * row, stride=4 * row))
    assert _read(regions) == _expected_stream(layers, ids, (slice(None), slice(0, 3)))
    assert len(regions) == len(block_regions(layers, ids)) + len(layers)


def test_a_tail_on_interleaved_and_mixed_blocks_keeps_the_packed_order() -> None:
    both = torch.arange(10 * 2 * 6, dtype=torch.float32).reshape(10, 2, 6)
    keys, values = both[:, 0], both[:, 1]
    regions = block_regions([keys, values], [1, 2, 3], BlockTail(1, 8))
    expected = torch.cat([keys[1:3].reshape(-1), keys[3, :2], values[1:3].reshape(-1),
                          values[3, :2]])
    assert _read(regions) == expected.numpy().tobytes()
    small = torch.arange(10 * 6, dtype=torch.float32).reshape(10, 6)
    large = torch.arange(10 * 10, dtype=torch.float32).reshape(10, 10) + 1000
    regions = block_regions([small, large], [4, 1], BlockTail(2, 4, stride=8))
    expected = torch.cat([small[4], small[1, [0, 2]], large[4], large[1, [0, 2]]])
    assert regions.nbytes == expected.numel() * 4
    assert _read(regions) == expected.numpy().tobytes()


@pytest.mark.parametrize("tail", [BlockTail(0, 4), BlockTail(1, 0), BlockTail(1, 49),
                                  BlockTail(2, 8, stride=4), BlockTail(3, 8, stride=24),
                                  BlockTail(True, 4), "prefix"],
                         ids=["no-ranges", "empty", "too-long", "overlapping", "past-the-end",
                              "bool", "not-a-tail"])
def test_a_tail_that_does_not_fit_a_block_is_refused(tail: object) -> None:
    layers = _layers()  # blocks of 4 x 2 x 3 float16: 48 bytes
    with pytest.raises(InvalidBufferError):
        block_regions(layers, [0, 1], tail)  # type: ignore[arg-type]


def test_buffer_regions_is_one_region_over_the_buffer() -> None:
    buf = torch.arange(24, dtype=torch.float32)
    regions = buffer_regions(buf)
    assert (len(regions), regions.nbytes) == (1, 96)
    assert _read(regions) == buf.numpy().tobytes()
    with pytest.raises(InvalidBufferError):
        buffer_regions(buf[::2])


@pytest.mark.parametrize("seed", range(5))
def test_common_cut_carries_the_same_byte_stream(seed: int) -> None:
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
    local, remote, pieces = common_cut(local_addresses, local_lengths,
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
