"""Block gather/scatter on the CPU: the torch reference and the compiled C++ kernel produce the
expected bytes for every KV dtype and odd sizes, write every byte they claim, round-trip, and
raise the same typed errors before copying anything."""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Callable, Iterator, Sequence

import kvhandoff.cuda_ext as cuda_ext
import pytest
import torch
from kvhandoff.cuda_ext import (
    BlockCopyConfigError,
    BlockCopyError,
    BlockIdOutOfRangeError,
    BufferSizeError,
    DuplicateBlockIdError,
    InvalidBlockIdsError,
    LayerMismatchError,
    NonContiguousLayerError,
    PackedBufferError,
    _loader,
    errors,
    gather_ref,
    packed_nbytes,
    scatter_ref,
)

KV_DTYPES = [torch.float16, torch.bfloat16, torch.float32] + [
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)
]
POISONS = (0x00, 0xFF)

Gather = Callable[[Sequence[torch.Tensor], object, torch.Tensor], torch.Tensor]
Scatter = Callable[[torch.Tensor, Sequence[torch.Tensor], object], None]


def compiler_available() -> bool:
    import os

    from torch.utils.cpp_extension import is_ninja_available

    return shutil.which(os.environ.get("CXX", "c++")) is not None and is_ninja_available()


@pytest.fixture(scope="module")
def compiled_extension() -> object:
    """The JIT-built extension, built once per test process (later runs reuse the cache)."""
    if not compiler_available():
        pytest.skip("no C++ compiler or ninja: the compiled backend cannot be built here")
    return _loader.extension(required=True)


@pytest.fixture(params=["torch", "cpp"])
def impl(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Gather, Scatter]]:
    """(gather, scatter) of one backend: the torch reference itself, or the public functions
    with the compiled extension required."""
    if request.param == "torch":
        yield gather_ref, scatter_ref
        return
    request.getfixturevalue("compiled_extension")
    monkeypatch.setenv(_loader.BACKEND_ENV, "cpp")
    assert cuda_ext.backend("cpu") == "cpp"
    yield cuda_ext.gather, cuda_ext.scatter


def make_layers(
    n: int, num_blocks: int, block_shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn((num_blocks, *block_shape), generator=generator).to(dtype) for _ in range(n)
    ]


def block_bytes(layer: torch.Tensor, block_id: int) -> torch.Tensor:
    return layer[block_id].reshape(-1).view(torch.uint8)


def expected_packed(layers: Sequence[torch.Tensor], block_ids: Sequence[int]) -> torch.Tensor:
    """The packed bytes spelled out block by block, independently of the code under test."""
    parts = [block_bytes(layer, b) for layer in layers for b in block_ids]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def snapshot(layers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [layer.clone() for layer in layers]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_cuda_ext_all_matches_exports() -> None:
    public = {name for name in vars(cuda_ext) if not name.startswith("_")}
    public -= {"annotations", "errors"}
    assert set(cuda_ext.__all__) == public
    for name in cuda_ext.__all__:
        assert getattr(cuda_ext, name) is not None


@pytest.mark.parametrize("dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("n_layers", "num_blocks", "block_shape", "block_ids"),
    [
        (2, 7, (3, 5, 1), [6, 0, 3, 3, 1]),  # odd block bytes, a repeated id (legal in gather)
        (5, 3, (), [2, 0]),  # 1-D layers: a block is one element
        (64, 9, (4, 2), list(range(9))[::-1]),  # many tensors, every block
        (2, 2, (131_075,), [1]),  # one block > 256 KiB at fp16: split into chunks
        (3, 300, (1, 1), list(range(0, 300, 7))),  # many tiny blocks
    ],
)
def test_gather_writes_every_packed_byte(
    impl: tuple[Gather, Scatter],
    dtype: torch.dtype,
    n_layers: int,
    num_blocks: int,
    block_shape: tuple[int, ...],
    block_ids: list[int],
) -> None:
    gather, _ = impl
    layers = make_layers(n_layers, num_blocks, block_shape, dtype)
    before = snapshot(layers)
    expected = expected_packed(layers, block_ids)
    assert packed_nbytes(layers, len(block_ids)) == expected.numel()
    for poison in POISONS:
        backing = torch.full((expected.numel() + 37,), poison, dtype=torch.uint8)
        out = backing[:expected.numel()]
        used = gather(layers, block_ids, out)
        assert used.data_ptr() == out.data_ptr() and used.numel() == expected.numel()
        assert torch.equal(used, expected)  # with both poisons: every byte was written
        assert bool((backing[expected.numel():] == poison).all())  # nothing past the end
    assert all(same_bytes(a, b) for a, b in zip(layers, before, strict=True))


@pytest.mark.parametrize("dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("n_layers", "num_blocks", "block_shape", "block_ids"),
    [
        (2, 7, (3, 5, 1), [6, 0, 3, 1]),
        (5, 3, (), [2, 0]),
        (64, 9, (4, 2), list(range(9))[::-1]),
        (2, 2, (131_075,), [1]),
        (3, 300, (1, 1), list(range(299, 0, -7))),
    ],
)
def test_scatter_writes_chosen_blocks_only(
    impl: tuple[Gather, Scatter],
    dtype: torch.dtype,
    n_layers: int,
    num_blocks: int,
    block_shape: tuple[int, ...],
    block_ids: list[int],
) -> None:
    _, scatter = impl
    source = make_layers(n_layers, num_blocks, block_shape, dtype, seed=1)
    packed = expected_packed(source, block_ids)
    packed_before = packed.clone()
    for poison in POISONS:
        layers = [torch.full_like(layer.view(torch.uint8), poison).view(dtype)
                  for layer in source]
        scatter(packed, layers, block_ids)
        for layer, src in zip(layers, source, strict=True):
            for b in range(num_blocks):
                if b in block_ids:
                    assert torch.equal(block_bytes(layer, b), block_bytes(src, b))
                else:
                    assert bool((block_bytes(layer, b) == poison).all())
    assert torch.equal(packed, packed_before)


@pytest.mark.parametrize("dtype", KV_DTYPES, ids=str)
def test_gather_scatter_round_trip(impl: tuple[Gather, Scatter], dtype: torch.dtype) -> None:
    gather, scatter = impl
    source = make_layers(6, 33, (5, 3, 7), dtype, seed=2)
    destination = make_layers(6, 40, (5, 3, 7), dtype, seed=3)
    src_ids = torch.randperm(33, generator=torch.Generator().manual_seed(4))[:17]
    dst_ids = torch.randperm(40, generator=torch.Generator().manual_seed(5))[:17].tolist()
    out = torch.empty(packed_nbytes(source, 17), dtype=torch.uint8)
    packed = gather(source, src_ids, out)
    scatter(packed, destination, dst_ids)
    for s_layer, d_layer in zip(source, destination, strict=True):
        for s, d in zip(src_ids.tolist(), dst_ids, strict=True):
            assert torch.equal(block_bytes(s_layer, s), block_bytes(d_layer, d))
    again = gather(destination, dst_ids, torch.empty_like(out))
    assert torch.equal(again, packed)


def test_gather_accepts_id_tensors_and_layer_sublists(impl: tuple[Gather, Scatter]) -> None:
    gather, _ = impl
    layers = make_layers(8, 12, (3, 2), torch.float16)
    subset = layers[2:5]
    ids = [11, 4, 0]
    expected = expected_packed(subset, ids)
    for form in (ids, tuple(ids), torch.tensor(ids), torch.tensor(ids, dtype=torch.int32)):
        out = torch.empty(expected.numel(), dtype=torch.uint8)
        assert torch.equal(gather(subset, form, out), expected)


def test_gather_with_no_block_ids_returns_empty_view(impl: tuple[Gather, Scatter]) -> None:
    gather, scatter = impl
    layers = make_layers(2, 4, (3,), torch.float32)
    before = snapshot(layers)
    backing = torch.full((8,), 7, dtype=torch.uint8)
    used = gather(layers, [], backing[:0])
    assert used.numel() == 0
    scatter(backing[:0], layers, torch.empty(0, dtype=torch.int64))
    assert bool((backing == 7).all())
    assert all(same_bytes(a, b) for a, b in zip(layers, before, strict=True))


def test_gather_on_shared_storage_views(impl: tuple[Gather, Scatter]) -> None:
    """Layers that are contiguous slices of one big allocation (as a pool may lay them out)
    start at odd addresses when the block size is odd; the copy must not assume alignment."""
    gather, scatter = impl
    storage = torch.randint(0, 256, (4 * 9 * 13 + 3,), dtype=torch.uint8)
    layers = [storage[3 + i * 117:3 + (i + 1) * 117].view(9, 13) for i in range(4)]
    ids = [8, 2, 5]
    out = torch.empty(packed_nbytes(layers, 3) + 1, dtype=torch.uint8)[1:]  # odd address
    packed = gather(layers, ids, out)
    assert torch.equal(packed, expected_packed(layers, ids))
    target = [torch.zeros(9, 13, dtype=torch.uint8) for _ in range(4)]
    scatter(packed, target, ids)
    for layer, src in zip(target, layers, strict=True):
        assert torch.equal(layer[ids], src[ids])


# -- errors: same type from every backend, raised before any byte moves ----------------------


def bad_calls() -> list[tuple[str, Callable[[], tuple], type[BlockCopyError], dict]]:
    """(name, () -> (op, layers, ids, buf), error type, expected attributes)."""

    def good(n: int = 3, num_blocks: int = 6) -> list[torch.Tensor]:
        return make_layers(n, num_blocks, (2, 3), torch.float16, seed=9)

    def buf(layers: Sequence[torch.Tensor], n_ids: int) -> torch.Tensor:
        return torch.full((packed_nbytes(layers, n_ids),), 0x5A, dtype=torch.uint8)

    def case_dtype() -> tuple:
        layers = good()
        layers[2] = layers[2].float()
        return "gather", layers, [1], buf(layers[:1], 3)

    def case_device() -> tuple:
        layers = good()
        layers[1] = torch.empty(layers[0].shape, dtype=layers[0].dtype, device="meta")
        return "gather", layers, [1], buf(layers[:1], 3)

    def case_shape() -> tuple:
        layers = good()
        packed = buf(layers, 1)
        layers[1] = make_layers(1, 7, (2, 3), torch.float16)[0]
        return "scatter", layers, [1], packed

    def case_block_shape() -> tuple:
        layers = good()
        packed = buf(layers, 1)
        layers[2] = make_layers(1, 6, (3, 2), torch.float16)[0]
        return "gather", layers, [1], packed

    def case_noncontiguous() -> tuple:
        layers = good()
        layers[1] = make_layers(1, 6, (3, 2), torch.float16)[0].transpose(1, 2)
        return "gather", layers, [1], buf(layers[:1], 3)

    def case_empty() -> tuple:
        return "gather", [], [0], torch.empty(4, dtype=torch.uint8)

    def case_scalar_layer() -> tuple:
        return "gather", [torch.tensor(1.0)], [0], torch.empty(4, dtype=torch.uint8)

    def case_range_high() -> tuple:
        layers = good()
        return "gather", layers, [0, 6, 2, 9], buf(layers, 4)

    def case_range_negative() -> tuple:
        layers = good()
        return "scatter", layers, torch.tensor([3, -1]), buf(layers, 2)

    def case_duplicate() -> tuple:
        layers = good()
        return "scatter", layers, [4, 1, 4, 5, 1], buf(layers, 5)

    def case_small() -> tuple:
        layers = good()
        return "gather", layers, [0, 1], buf(layers, 2)[:-1]

    def case_small_scatter() -> tuple:
        layers = good()
        return "scatter", layers, [0, 1, 2], buf(layers, 2)

    def case_large() -> tuple:
        layers = good()
        return "gather", layers, [0, 1], buf(layers, 3)

    def case_large_scatter() -> tuple:
        # The old prefix rule would have read the first 72 bytes and ignored the rest.
        layers = good()
        return "scatter", layers, [0, 1], torch.cat([buf(layers, 2), buf(layers, 1)[:1]])

    def case_empty_ids_nonempty_buf() -> tuple:
        layers = good()
        return "scatter", layers, [], buf(layers, 1)

    def case_buf_dtype() -> tuple:
        layers = good()
        return "gather", layers, [0], torch.empty(packed_nbytes(layers, 1) // 2,
                                                 dtype=torch.float16)

    def case_buf_2d() -> tuple:
        layers = good()
        return "gather", layers, [0], buf(layers, 1).view(2, -1)

    def case_buf_strided() -> tuple:
        layers = good()
        return "scatter", layers, [0], buf(layers, 2)[::2]

    def case_buf_device() -> tuple:
        layers = good()
        return "gather", layers, [0], torch.empty(packed_nbytes(layers, 1), dtype=torch.uint8,
                                                 device="meta")

    def case_float_ids() -> tuple:
        layers = good()
        return "gather", layers, [1.5, 2], buf(layers, 2)

    def case_float_id_tensor() -> tuple:
        layers = good()
        return "gather", layers, torch.tensor([1.0]), buf(layers, 1)

    def case_2d_id_tensor() -> tuple:
        layers = good()
        return "scatter", layers, torch.tensor([[1, 2]]), buf(layers, 2)

    return [
        ("dtype", case_dtype, LayerMismatchError,
         {"index": 2, "field": "dtype", "expected": torch.float16, "got": torch.float32}),
        ("device", case_device, LayerMismatchError, {"index": 1, "field": "device"}),
        ("num_blocks", case_shape, LayerMismatchError,
         {"index": 1, "field": "shape", "expected": [6, 2, 3], "got": [7, 2, 3]}),
        ("block_shape", case_block_shape, LayerMismatchError,
         {"index": 2, "field": "shape", "got": [6, 3, 2]}),
        ("noncontiguous", case_noncontiguous, NonContiguousLayerError,
         {"index": 1, "shape": (6, 2, 3), "stride": (6, 1, 2)}),
        ("empty", case_empty, LayerMismatchError, {"index": None, "field": "count"}),
        ("scalar", case_scalar_layer, LayerMismatchError, {"index": 0, "field": "shape"}),
        ("range_high", case_range_high, BlockIdOutOfRangeError,
         {"block_ids": [6, 9], "num_blocks": 6}),
        ("range_negative", case_range_negative, BlockIdOutOfRangeError,
         {"block_ids": [-1], "num_blocks": 6}),
        ("duplicate", case_duplicate, DuplicateBlockIdError, {"block_ids": [1, 4]}),
        ("small", case_small, BufferSizeError, {"needed_nbytes": 72, "got_nbytes": 71}),
        ("small_scatter", case_small_scatter, BufferSizeError,
         {"needed_nbytes": 108, "got_nbytes": 72}),
        ("large", case_large, BufferSizeError, {"needed_nbytes": 72, "got_nbytes": 108}),
        ("large_scatter", case_large_scatter, BufferSizeError,
         {"needed_nbytes": 72, "got_nbytes": 73}),
        ("empty_ids_nonempty_buf", case_empty_ids_nonempty_buf, BufferSizeError,
         {"needed_nbytes": 0, "got_nbytes": 36}),
        ("buf_dtype", case_buf_dtype, PackedBufferError,
         {"field": "dtype", "got": torch.float16}),
        ("buf_2d", case_buf_2d, PackedBufferError, {"field": "dim", "got": 2}),
        ("buf_strided", case_buf_strided, PackedBufferError, {"field": "contiguous"}),
        ("buf_device", case_buf_device, PackedBufferError, {"field": "device"}),
        ("float_ids", case_float_ids, InvalidBlockIdsError, {}),
        ("float_id_tensor", case_float_id_tensor, InvalidBlockIdsError, {}),
        ("2d_id_tensor", case_2d_id_tensor, InvalidBlockIdsError, {}),
    ]


@pytest.mark.parametrize(
    ("make_call", "error", "attributes"),
    [case[1:] for case in bad_calls()],
    ids=[case[0] for case in bad_calls()],
)
def test_block_copy_rejects_bad_call_before_copying(
    impl: tuple[Gather, Scatter],
    make_call: Callable[[], tuple],
    error: type[BlockCopyError],
    attributes: dict,
) -> None:
    gather, scatter = impl
    op, layers, ids, buf = make_call()
    layers_before = [layer.clone() for layer in layers if layer.device.type == "cpu"]
    buf_before = buf.clone() if buf.device.type == "cpu" else None
    with pytest.raises(error) as info:
        if op == "gather":
            gather(layers, ids, buf)
        else:
            scatter(buf, layers, ids)
    assert type(info.value) is error
    for name, value in attributes.items():
        assert getattr(info.value, name) == value, name
    after = [layer for layer in layers if layer.device.type == "cpu"]
    assert all(same_bytes(a, b) for a, b in zip(after, layers_before, strict=True))
    if buf_before is not None:
        assert same_bytes(buf, buf_before)


def test_block_copy_errors_pickle_with_their_data() -> None:
    samples = [
        LayerMismatchError(3, "dtype", torch.float16, torch.float32),
        NonContiguousLayerError(1, (2, 3), (1, 2)),
        InvalidBlockIdsError("float"),
        BlockIdOutOfRangeError([9, -1], 8),
        DuplicateBlockIdError([4]),
        PackedBufferError("dim", 1, 2),
        BufferSizeError(10, 9),
        errors.ExtensionUnavailableError("no compiler"),
        BlockCopyConfigError("KVHANDOFF_BLOCK_COPY", "gpu", ("auto", "torch", "cpp")),
    ]
    for error in samples:
        clone = pickle.loads(pickle.dumps(error))
        assert type(clone) is type(error) and str(clone) == str(error)
        assert vars(clone) == vars(error)


def test_block_copy_env_torch_forces_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_loader.BACKEND_ENV, "torch")
    assert cuda_ext.backend("cpu") == "torch"
    layers = make_layers(2, 5, (3,), torch.bfloat16)
    out = torch.empty(packed_nbytes(layers, 2), dtype=torch.uint8)
    assert torch.equal(cuda_ext.gather(layers, [4, 0], out), expected_packed(layers, [4, 0]))


def test_block_copy_env_unknown_value_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_loader.BACKEND_ENV, "gpu")
    with pytest.raises(BlockCopyConfigError) as info:
        cuda_ext.backend("cpu")
    assert info.value.value == "gpu" and "torch" in info.value.allowed


def test_block_copy_backend_is_cpp_when_extension_builds(
    compiled_extension: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(_loader.BACKEND_ENV, raising=False)
    assert cuda_ext.backend("cpu") == "cpp"
    assert compiled_extension.with_cuda() is _loader._cuda_wanted()
