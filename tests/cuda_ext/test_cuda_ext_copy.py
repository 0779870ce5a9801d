"""Block-to-block copies on the CPU: ``copy_blocks`` and ``copy_regions`` from the torch
reference and the compiled C++ kernel write exactly the bytes a gather of the source followed
by a scatter into the destination would, for every KV dtype, random layouts and region lists
cut at different places, and refuse bad calls with the same typed errors before copying."""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable, Iterator, Sequence

import attrs
import kvhandoff.cuda_ext as cuda_ext
import numpy as np
import pytest
import torch
from kvhandoff.cuda_ext import (
    BlockCopyError,
    BlockCopySidesError,
    BlockIdOutOfRangeError,
    DuplicateBlockIdError,
    InvalidBlockIdsError,
    InvalidRegionsError,
    LayerMismatchError,
    NonContiguousLayerError,
    OverlappingCopyError,
    RegionSizeMismatchError,
    _loader,
    copy_blocks_ref,
    copy_regions_ref,
    gather_ref,
    packed_nbytes,
)
from kvhandoff.engine.transports import Regions, block_regions

KV_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.int8] + [
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)
]
POISONS = (0x00, 0xFF)

CopyBlocks = Callable[[Sequence[torch.Tensor], object, Sequence[torch.Tensor], object], None]
CopyRegions = Callable[[Regions, Regions], None]


@pytest.fixture(params=["torch", "cpp"])
def impl(request: pytest.FixtureRequest,
         monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[CopyBlocks, CopyRegions]]:
    """(copy_blocks, copy_regions) of one backend: the torch reference itself, or the public
    functions with the compiled extension required."""
    if request.param == "torch":
        yield copy_blocks_ref, copy_regions_ref
        return
    from torch.utils.cpp_extension import is_ninja_available

    if shutil.which(os.environ.get("CXX", "c++")) is None or not is_ninja_available():
        pytest.skip("no C++ compiler or ninja: the compiled backend cannot be built here")
    _loader.extension(required=True)
    monkeypatch.setenv(_loader.BACKEND_ENV, "cpp")
    assert cuda_ext.backend("cpu") == "cpp"
    yield cuda_ext.copy_blocks, cuda_ext.copy_regions


def random_layers(n: int, num_blocks: int, block_shape: tuple[int, ...], dtype: torch.dtype,
                  seed: int) -> list[torch.Tensor]:
    """``n`` layer tensors of random bytes (any dtype, fp8 included: bytes, not values)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (num_blocks, *block_shape, torch.empty(0, dtype=dtype)
                                   .element_size()), dtype=torch.uint8, generator=generator)
            .view(dtype).reshape(num_blocks, *block_shape) for _ in range(n)]


def as_bytes(layers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [layer.reshape(-1).view(torch.uint8).clone() for layer in layers]


def spelled_out(src: Sequence[torch.Tensor], src_ids: Sequence[int],
                dst: Sequence[torch.Tensor], dst_ids: Sequence[int]) -> list[torch.Tensor]:
    """The destination's expected bytes, block by block, independently of the code under
    test: every named block replaced by its source, every other byte as it was."""
    out = [layer.clone() for layer in dst]
    for s_layer, d_layer in zip(src, out, strict=True):
        for s, d in zip(src_ids, dst_ids, strict=True):
            d_layer[d].view(-1).view(torch.uint8).copy_(s_layer[s].reshape(-1).view(torch.uint8))
    return out


def assert_same_bytes(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> None:
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("n_layers", "src_blocks", "dst_blocks", "block_shape", "n_ids"),
    [
        (2, 7, 9, (3, 5, 1), 5),  # odd block bytes
        (5, 3, 4, (), 2),  # 1-D layers: a block is one element
        (64, 9, 9, (4, 2), 9),  # many tensors, every block
        (2, 2, 3, (131_075,), 2),  # blocks > 256 KiB at fp16: split into chunks
        (3, 300, 310, (1, 1), 43),  # many tiny blocks
    ],
)
def test_copy_blocks_writes_the_named_blocks_only(
    impl: tuple[CopyBlocks, CopyRegions], dtype: torch.dtype, n_layers: int, src_blocks: int,
    dst_blocks: int, block_shape: tuple[int, ...], n_ids: int,
) -> None:
    copy_blocks, _ = impl
    generator = torch.Generator().manual_seed(n_ids)
    src_ids = torch.randint(0, src_blocks, (n_ids,), generator=generator).tolist()  # repeats
    dst_ids = torch.randperm(dst_blocks, generator=generator)[:n_ids].tolist()
    source = random_layers(n_layers, src_blocks, block_shape, dtype, seed=1)
    source_before = as_bytes(source)
    for poison in POISONS:
        target = [torch.full((dst_blocks, *block_shape, source[0].element_size()), poison,
                             dtype=torch.uint8).view(dtype).reshape(dst_blocks, *block_shape)
                  for _ in range(n_layers)]
        want = spelled_out(source, src_ids, target, dst_ids)
        copy_blocks(source, src_ids, target, dst_ids)
        assert_same_bytes(target, want)
    assert_same_bytes(source, source_before)


@pytest.mark.parametrize("dtype", KV_DTYPES, ids=str)
def test_copy_blocks_equals_gather_then_scatter(impl: tuple[CopyBlocks, CopyRegions],
                                                dtype: torch.dtype) -> None:
    copy_blocks, _ = impl
    source = random_layers(6, 33, (5, 3, 7), dtype, seed=2)
    target = random_layers(6, 40, (5, 3, 7), dtype, seed=3)
    src_ids = torch.randperm(33, generator=torch.Generator().manual_seed(4))[:17]
    dst_ids = torch.randperm(40, generator=torch.Generator().manual_seed(5))[:17]
    staged = [t.clone() for t in target]
    packed = gather_ref(source, src_ids, torch.empty(packed_nbytes(source, 17),
                                                    dtype=torch.uint8))
    cuda_ext.scatter_ref(packed, staged, dst_ids)
    copy_blocks(source, src_ids, target, dst_ids.to(torch.int32))
    assert_same_bytes(target, staged)


def test_copy_blocks_within_one_pool_between_disjoint_blocks(
        impl: tuple[CopyBlocks, CopyRegions]) -> None:
    """Sides in one storage are fine while no destination byte is also read: another layer
    pair of the same pool, or other blocks of the same layers."""
    copy_blocks, _ = impl
    pool = torch.randint(0, 256, (4, 10, 24), dtype=torch.uint8)
    layers = list(pool.unbind(0))
    want = spelled_out(layers[:2], [1, 2, 3], layers[2:], [1, 2, 3])
    copy_blocks(layers[:2], [1, 2, 3], layers[2:], [1, 2, 3])
    assert_same_bytes(layers[2:], want)
    want = spelled_out(layers, [0, 0, 9], layers, [4, 5, 6])
    copy_blocks(layers, [0, 0, 9], layers, [4, 5, 6])
    assert_same_bytes(layers, want)


def test_copy_blocks_with_no_ids_copies_nothing(impl: tuple[CopyBlocks, CopyRegions]) -> None:
    copy_blocks, _ = impl
    source, target = random_layers(2, 4, (3,), torch.float32, 6), random_layers(
        2, 4, (3,), torch.float32, 7)
    before = as_bytes(target)
    copy_blocks(source, [], target, torch.empty(0, dtype=torch.int64))
    assert_same_bytes(target, before)


# -- copy_regions ------------------------------------------------------------------------


def cut(regions: Regions, pieces: int, seed: int) -> Regions:
    """The same byte stream as ``regions`` cut at ``pieces`` random extra places (some
    regions of length zero included): what another side's layout would look like."""
    ends = np.cumsum(regions.lengths, dtype=np.uint64)
    starts = ends - regions.lengths
    rng = np.random.default_rng(seed)
    cuts = np.unique(np.concatenate(
        [starts, rng.integers(0, regions.nbytes, pieces, dtype=np.uint64)]))
    region = np.searchsorted(ends, cuts, side="right")
    addresses = regions.addresses[region] + (cuts - starts[region])
    lengths = np.diff(np.append(cuts, np.uint64(regions.nbytes))).astype(np.uint64)
    empty = rng.integers(0, len(addresses), 3)  # a few empty regions, where they start
    addresses = np.insert(addresses, empty, addresses[empty])
    lengths = np.insert(lengths, empty, np.uint64(0))
    return Regions(addresses, lengths, regions.device, regions.owners, regions.nbytes)


@pytest.mark.parametrize("dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize("case", range(4))
def test_copy_regions_equals_copy_blocks(impl: tuple[CopyBlocks, CopyRegions],
                                         dtype: torch.dtype, case: int) -> None:
    """Random pools, ids with runs and repeats, and either side cut at random extra places:
    the stream lands exactly where copy_blocks puts it."""
    _, copy_regions = impl
    generator = torch.Generator().manual_seed(case)
    n_layers = int(torch.randint(1, 9, (1,), generator=generator))
    block_shape = tuple(int(d) for d in torch.randint(1, 6, (2,), generator=generator))
    n_ids = int(torch.randint(1, 30, (1,), generator=generator))
    source = random_layers(n_layers, 40, block_shape, dtype, seed=10 + case)
    target = random_layers(n_layers, 50, block_shape, dtype, seed=20 + case)
    start = int(torch.randint(0, 40 - n_ids + 1, (1,), generator=generator))
    src_ids = list(range(start, start + n_ids)) if case % 2 else torch.randint(
        0, 40, (n_ids,), generator=generator).tolist()
    dst_ids = torch.randperm(50, generator=generator)[:n_ids].tolist()
    want = spelled_out(source, src_ids, target, dst_ids)
    src, dst = block_regions(source, src_ids), block_regions(target, dst_ids)
    if case >= 2:
        src, dst = cut(src, 7, seed=case), cut(dst, 11, seed=case + 1)
    copy_regions(src, dst)
    assert_same_bytes(target, want)


def test_copy_regions_between_a_buffer_and_blocks(impl: tuple[CopyBlocks, CopyRegions]) -> None:
    """A contiguous buffer is one region: regions -> buffer is a gather, buffer -> regions a
    scatter."""
    _, copy_regions = impl
    source = random_layers(4, 12, (2, 8), torch.bfloat16, seed=30)
    ids = [11, 3, 4, 5, 0]
    buf = torch.zeros(packed_nbytes(source, len(ids)), dtype=torch.uint8)
    one = Regions(np.array([buf.data_ptr()], dtype=np.uint64),
                  np.array([buf.numel()], dtype=np.uint64), buf.device, (buf,), buf.numel())
    copy_regions(block_regions(source, ids), one)
    assert torch.equal(buf, gather_ref(source, ids, torch.empty_like(buf)))
    target = random_layers(4, 12, (2, 8), torch.bfloat16, seed=31)
    want = spelled_out(source, ids, target, [0, 1, 2, 6, 7])
    copy_regions(one, block_regions(target, [0, 1, 2, 6, 7]))
    assert_same_bytes(target, want)


def test_copy_regions_large_stream_splits_over_threads(
        impl: tuple[CopyBlocks, CopyRegions]) -> None:
    """Several MiB in regions of uneven sizes: every thread's share of the stream starts
    mid-region somewhere, and the result is still exact."""
    _, copy_regions = impl
    source = random_layers(3, 64, (3000,), torch.float16, seed=40)  # 6000 B blocks
    target = random_layers(3, 64, (3000,), torch.float16, seed=41)
    src_ids = [*range(5, 50), 1, 60, 2]
    dst_ids = torch.randperm(64, generator=torch.Generator().manual_seed(2))[:48].tolist()
    want = spelled_out(source, src_ids, target, dst_ids)
    copy_regions(block_regions(source, src_ids), cut(block_regions(target, dst_ids), 50, 3))
    assert_same_bytes(target, want)


# -- errors: same type from every backend, raised before any byte moves ----------------------


def bad_block_copies() -> list[tuple[str, Callable[[], tuple], type[BlockCopyError], dict]]:
    """(name, () -> (src, src_ids, dst, dst_ids), error type, expected attributes)."""

    def side(n: int = 3, num_blocks: int = 6, shape: tuple[int, ...] = (2, 3),
             dtype: torch.dtype = torch.float16, seed: int = 0) -> list[torch.Tensor]:
        return random_layers(n, num_blocks, shape, dtype, seed)

    pool = torch.zeros(2, 6, 4, dtype=torch.float16)
    return [
        ("src_empty", lambda: ([], [0], side(), [0]), LayerMismatchError,
         {"index": None, "field": "count"}),
        ("dst_dtype", lambda: (side(), [0], [*side(2), side(1, dtype=torch.float32)[0]], [0]),
         LayerMismatchError, {"index": 2, "field": "dtype"}),
        ("dst_noncontiguous",
         lambda: (side(), [0], [*side(2), side(1, shape=(3, 2))[0].transpose(1, 2)], [0]),
         NonContiguousLayerError, {"index": 2}),
        ("count", lambda: (side(3), [0], side(2), [0]), BlockCopySidesError,
         {"field": "count", "source": 3, "destination": 2}),
        ("block_shape", lambda: (side(), [0], side(shape=(3, 2)), [0]), BlockCopySidesError,
         {"field": "block_shape", "source": [2, 3], "destination": [3, 2]}),
        ("dtype", lambda: (side(), [0], side(dtype=torch.bfloat16), [0]), BlockCopySidesError,
         {"field": "dtype", "source": torch.float16, "destination": torch.bfloat16}),
        ("device", lambda: (side(), [0], [torch.empty(6, 2, 3, dtype=torch.float16,
                                                      device="meta")] * 3, [0]),
         BlockCopySidesError, {"field": "device"}),
        ("src_range", lambda: (side(), [0, 6, -1], side(num_blocks=9), [0, 1, 2]),
         BlockIdOutOfRangeError, {"block_ids": [6, -1], "num_blocks": 6}),
        ("dst_range", lambda: (side(num_blocks=9), [0, 8], side(), [1, 6]),
         BlockIdOutOfRangeError, {"block_ids": [6], "num_blocks": 6}),
        ("dst_duplicate", lambda: (side(), [0, 1, 2], side(), [4, 3, 4]),
         DuplicateBlockIdError, {"block_ids": [4]}),
        ("num_ids", lambda: (side(), [0, 1, 2], side(), [4, 3]), BlockCopySidesError,
         {"field": "num_ids", "source": 3, "destination": 2}),
        ("float_ids", lambda: (side(), [0.5], side(), [1]), InvalidBlockIdsError, {}),
        ("overlap", lambda: (list(pool.unbind(0)), [1, 2], list(pool.unbind(0)), [3, 1]),
         OverlappingCopyError, {"address": pool[0, 1].data_ptr(), "nbytes": 8}),
    ]


@pytest.mark.parametrize(("make_call", "error", "attributes"),
                         [case[1:] for case in bad_block_copies()],
                         ids=[case[0] for case in bad_block_copies()])
def test_copy_blocks_rejects_bad_call_before_copying(
    impl: tuple[CopyBlocks, CopyRegions], make_call: Callable[[], tuple],
    error: type[BlockCopyError], attributes: dict,
) -> None:
    copy_blocks, _ = impl
    src, src_ids, dst, dst_ids = make_call()
    before = [t.clone() for t in (*src, *dst) if t.device.type == "cpu"]
    with pytest.raises(error) as info:
        copy_blocks(src, src_ids, dst, dst_ids)
    assert type(info.value) is error
    for name, value in attributes.items():
        assert getattr(info.value, name) == value, name
    assert_same_bytes([t for t in (*src, *dst) if t.device.type == "cpu"], before)


def bad_region_copies() -> list[tuple[str, Callable[[], tuple], type[BlockCopyError], dict]]:
    """(name, () -> (src regions, dst regions), error type, expected attributes)."""
    source = random_layers(2, 8, (4,), torch.float16, seed=50)
    target = random_layers(2, 8, (4,), torch.float16, seed=51)

    def good(layers: list[torch.Tensor], ids: list[int]) -> Regions:
        return block_regions(layers, ids)

    def with_(regions: Regions, **changes: object) -> Regions:
        return attrs.evolve(regions, **changes)

    stranger = torch.zeros(64, dtype=torch.uint8)
    return [
        ("sizes", lambda: (good(source, [0, 1]), good(target, [3])), RegionSizeMismatchError,
         {"source_nbytes": 32, "destination_nbytes": 16}),
        ("dtype", lambda: (with_(good(source, [0]), addresses=good(source, [0]).addresses
                                 .astype(np.int64)), good(target, [1])),
         InvalidRegionsError, {"side": "source"}),
        ("lengths", lambda: (good(source, [0]), with_(good(target, [1, 5]),
                                                      lengths=np.array([32], dtype=np.uint64))),
         InvalidRegionsError, {"side": "destination"}),
        ("outside_owners", lambda: (good(source, [0]), with_(
            good(target, [1]), addresses=np.array([stranger.data_ptr(), stranger.data_ptr()],
                                                  dtype=np.uint64))),
         InvalidRegionsError, {"side": "destination"}),
        ("past_owner_end", lambda: (good(source, [7, 7]), with_(
            good(target, [7]), lengths=np.array([16, 16], dtype=np.uint64),
            addresses=np.array([target[0][7].data_ptr(), target[1][7].data_ptr() + 8],
                               dtype=np.uint64))),
         InvalidRegionsError, {"side": "destination"}),
        ("overlap", lambda: (good(source, [2, 3]), good(source, [3, 4])), OverlappingCopyError,
         {"address": source[0][3].data_ptr(), "nbytes": 8}),
    ]


@pytest.mark.parametrize(("make_call", "error", "attributes"),
                         [case[1:] for case in bad_region_copies()],
                         ids=[case[0] for case in bad_region_copies()])
def test_copy_regions_rejects_bad_call_before_copying(
    impl: tuple[CopyBlocks, CopyRegions], make_call: Callable[[], tuple],
    error: type[BlockCopyError], attributes: dict,
) -> None:
    _, copy_regions = impl
    src, dst = make_call()
    owners = list({id(t): t for t in (*src.owners, *dst.owners)}.values())
    before = as_bytes(owners)
    with pytest.raises(error) as info:
        copy_regions(src, dst)
    assert type(info.value) is error
    for name, value in attributes.items():
        assert getattr(info.value, name) == value, name
    assert_same_bytes(owners, before)


def test_copy_errors_pickle_with_their_data() -> None:
    for error in (BlockCopySidesError("dtype", torch.float16, torch.float32),
                  InvalidRegionsError("source", "why"), RegionSizeMismatchError(3, 4),
                  OverlappingCopyError(0x1000, 8)):
        clone = pickle.loads(pickle.dumps(error))
        assert type(clone) is type(error) and str(clone) == str(error)
        assert vars(clone) == vars(error)


@pytest.mark.parametrize("n_ids", [1, 3, 40])
def test_copy_regions_with_the_same_cuts_on_both_sides(
        impl: tuple[CopyBlocks, CopyRegions], n_ids: int) -> None:
    """Scattered ids on both sides of pools of one form: region k goes to region k (the
    kernel's path without a merge when there are enough regions to share out)."""
    _, copy_regions = impl
    source = random_layers(6, 100, (7, 3), torch.float8_e4m3fn if hasattr(
        torch, "float8_e4m3fn") else torch.int8, seed=60)
    target = random_layers(6, 100, (7, 3), source[0].dtype, seed=61)
    src_ids, dst_ids = list(range(0, 2 * n_ids, 2)), list(range(99, 99 - 2 * n_ids, -2))
    src, dst = block_regions(source, src_ids), block_regions(target, dst_ids)
    assert np.array_equal(src.lengths, dst.lengths) and len(src) == 6 * n_ids
    want = spelled_out(source, src_ids, target, dst_ids)
    copy_regions(src, dst)
    assert_same_bytes(target, want)
