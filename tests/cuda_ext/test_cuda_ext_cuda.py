"""The CUDA block copy: its sources compile wherever nvcc is installed (no GPU needed), and on a
GPU the kernel matches the torch reference byte for byte, round-trips and raises the same
typed errors. The GPU tests skip without a GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import kvhandoff.cuda_ext as cuda_ext
import pytest
import torch
from kvhandoff.cuda_ext import (
    BlockIdOutOfRangeError,
    DuplicateBlockIdError,
    InvalidBlockIdsError,
    LayerMismatchError,
    PackedBufferError,
    _loader,
    gather_ref,
    packed_nbytes,
    scatter_ref,
)

CSRC = Path(_loader.CSRC)
NVCC = shutil.which("nvcc") or (
    str(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc") if os.environ.get("CUDA_HOME") else None
)
KV_DTYPES = [torch.float16, torch.bfloat16, torch.float32] + [
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)
]

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_nvcc
def test_cuda_kernel_compiles_with_nvcc(tmp_path: Path) -> None:
    assert NVCC is not None
    result = subprocess.run(
        [NVCC, "-c", "-O3", "-I", str(CSRC), str(CSRC / "block_copy_cuda.cu"),
         "-o", str(tmp_path / "block_copy_cuda.o")],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "block_copy_cuda.o").stat().st_size > 0
    assert "#include <torch" not in (CSRC / "block_copy_cuda.cu").read_text()
    assert "#include <torch" not in (CSRC / "block_copy.h").read_text()


@needs_nvcc
def test_cuda_host_side_compiles_against_torch_headers(tmp_path: Path) -> None:
    """The host half of the CUDA path is only built where CUDA torch is installed; check it
    here with the C++ compiler, the CUDA toolkit headers and torch's own headers."""
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler")
    assert NVCC is not None
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             str(Path(NVCC).resolve().parent.parent), "/usr/local/cuda"]
    found = [Path(r) / "include" for r in roots
             if r and (Path(r) / "include" / "cuda_runtime_api.h").exists()]
    if not found:
        pytest.skip(f"CUDA headers not found under any of {roots}")
    cuda_include = found[0]
    # CPU wheels of torch lack this one generated (empty on Linux) header of c10/cuda.
    shim = tmp_path / "shim"
    macros = shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in include_paths()):
        macros.parent.mkdir(parents=True)
        macros.write_text("#pragma once\n")
    includes = [f"-I{p}" for p in include_paths()]
    includes += [f"-I{sysconfig.get_paths()['include']}", f"-I{shim}", f"-I{cuda_include}",
                 f"-I{CSRC}"]
    result = subprocess.run(
        [cxx, "-std=c++20", "-fsyntax-only", "-DKVHANDOFF_WITH_CUDA", *includes,
         str(CSRC / "block_copy_cuda_host.cpp")],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- on a GPU -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_backend() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    module = _loader.extension(required=True)
    assert module is not None and module.with_cuda(), "the extension was built without CUDA"


def random_pool(n: int, num_blocks: int, block_shape: tuple[int, ...], dtype: torch.dtype,
                seed: int) -> torch.Tensor:
    """One GPU allocation ``[n, num_blocks, *block_shape]`` of random values (as a pool lays
    out its layers; ``list(pool.unbind(0))`` gives the contiguous layer tensors)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, num_blocks, *block_shape), generator=generator).to(dtype).cuda()


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("n_layers", "num_blocks", "block_shape", "n_ids", "out_offset"),
    [
        (64, 128, (16, 8, 64), 37, 0),  # 16 KiB fp16 blocks: 16-byte vectors
        (64, 128, (16, 8, 64), 37, 4),  # same, packed buffer only 4-byte aligned
        (3, 11, (3, 5, 1), 11, 1),  # odd block bytes and odd addresses: byte accesses
        (2, 3, (300_001,), 2, 0),  # blocks bigger than one CTA's chunk
    ],
)
def test_cuda_gather_scatter_match_reference(
    cuda_backend: None, dtype: torch.dtype, n_layers: int, num_blocks: int,
    block_shape: tuple[int, ...], n_ids: int, out_offset: int,
) -> None:
    assert cuda_ext.backend("cuda") == "cuda"
    layers = list(random_pool(n_layers, num_blocks, block_shape, dtype, seed=n_ids).unbind(0))
    ids = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(7))[:n_ids]
    nbytes = packed_nbytes(layers, n_ids)
    expected = gather_ref(layers, ids, torch.empty(nbytes, dtype=torch.uint8, device="cuda"))
    for poison in (0x00, 0xFF):
        backing = torch.full((out_offset + nbytes + 16,), poison, dtype=torch.uint8,
                             device="cuda")
        out = backing[out_offset:out_offset + nbytes]
        used = cuda_ext.gather(layers, ids, out)
        assert used.numel() == nbytes and torch.equal(used, expected)
        assert bool((backing[out_offset + nbytes:] == poison).all())
        assert bool((backing[:out_offset] == poison).all())
        target = [torch.full_like(layer.view(torch.uint8), poison).view(dtype)
                  for layer in layers]
        reference = [t.clone() for t in target]
        cuda_ext.scatter(used, target, ids.tolist())
        scatter_ref(expected, reference, ids)
        for got, want in zip(target, reference, strict=True):
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@needs_gpu
@pytest.mark.cuda
def test_cuda_gather_more_tensors_than_grid_y(cuda_backend: None) -> None:
    """gridDim.y stops at 65535: CTAs stride over the remaining tensors."""
    pool = random_pool(70_000, 3, (4,), torch.float16, seed=11)
    layers = list(pool.unbind(0))
    ids = [2, 0]
    out = torch.full((packed_nbytes(layers, 2),), 0xFF, dtype=torch.uint8, device="cuda")
    packed = cuda_ext.gather(layers, ids, out)
    assert torch.equal(packed, pool[:, ids].reshape(-1).view(torch.uint8))
    target = torch.zeros_like(pool)
    cuda_ext.scatter(packed, list(target.unbind(0)), ids)
    assert torch.equal(target[:, ids], pool[:, ids]) and bool((target[:, 1] == 0).all())


@needs_gpu
@pytest.mark.cuda
def test_cuda_round_trip_between_pools_on_a_side_stream(cuda_backend: None) -> None:
    source = list(random_pool(8, 40, (16, 2, 64), torch.bfloat16, seed=1).unbind(0))
    destination = list(random_pool(8, 50, (16, 2, 64), torch.bfloat16, seed=2).unbind(0))
    src_ids, dst_ids = list(range(0, 40, 3)), list(range(49, 49 - 14, -1))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the pools were filled on the default one
    with torch.cuda.stream(stream):
        out = torch.empty(packed_nbytes(source, 14), dtype=torch.uint8, device="cuda")
        packed = cuda_ext.gather(source, src_ids, out)
        cuda_ext.scatter(packed, destination, dst_ids)
    stream.synchronize()
    for s_layer, d_layer in zip(source, destination, strict=True):
        assert torch.equal(s_layer[src_ids].view(torch.uint8), d_layer[dst_ids].view(torch.uint8))


@needs_gpu
@pytest.mark.cuda
def test_cuda_rejects_bad_calls_with_typed_errors(cuda_backend: None) -> None:
    layers = list(random_pool(4, 6, (8, 16), torch.float16, seed=3).unbind(0))
    out = torch.zeros(packed_nbytes(layers, 3), dtype=torch.uint8, device="cuda")
    with pytest.raises(LayerMismatchError) as mismatch:
        cuda_ext.gather([*layers[:2], layers[2].cpu()], [0], out)
    assert mismatch.value.index == 2 and mismatch.value.field == "device"
    with pytest.raises(PackedBufferError):
        cuda_ext.gather(layers, [0], out.cpu())
    with pytest.raises(InvalidBlockIdsError):
        cuda_ext.gather(layers, torch.tensor([0], device="cuda"), out)
    with pytest.raises(BlockIdOutOfRangeError) as out_of_range:
        cuda_ext.gather(layers, [0, 6], out)
    assert out_of_range.value.block_ids == [6]
    with pytest.raises(DuplicateBlockIdError):
        cuda_ext.scatter(out, layers, [2, 2, 1])
    torch.cuda.synchronize()
    assert bool((out == 0).all())


# -- realistic shapes and error parity (added for `make gpu-check`) -------------------------


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_gather_scatter_realistic_pool_match_reference(
    cuda_backend: None, dtype: torch.dtype
) -> None:
    """32 layers of (K, V), blocks of 16 tokens x 8 heads x 128 dims (32 KiB each), a
    request's worth of ids in a random order: the kernel agrees with the torch reference
    byte for byte, both ways, and leaves every other block alone."""
    pool = random_pool(64, 256, (16, 8, 128), dtype, seed=21)
    layers = list(pool.unbind(0))
    ids = torch.randperm(256, generator=torch.Generator().manual_seed(5))[:100]
    nbytes = packed_nbytes(layers, ids.numel())
    expected = gather_ref(layers, ids, torch.empty(nbytes, dtype=torch.uint8, device="cuda"))
    packed = cuda_ext.gather(layers, ids, torch.empty(nbytes, dtype=torch.uint8, device="cuda"))
    assert torch.equal(packed, expected)
    target_ids = torch.randperm(256, generator=torch.Generator().manual_seed(6))[:100]
    target = torch.zeros_like(pool)
    reference = torch.zeros_like(pool)
    cuda_ext.scatter(packed, list(target.unbind(0)), target_ids)
    scatter_ref(expected, list(reference.unbind(0)), target_ids)
    assert torch.equal(target.view(torch.uint8), reference.view(torch.uint8))
    untouched = torch.ones(256, dtype=torch.bool)
    untouched[target_ids] = False
    assert bool((target[:, untouched.cuda()].view(torch.uint8) == 0).all())
    assert torch.equal(target[:, target_ids.cuda()].view(torch.uint8),
                       pool[:, ids.cuda()].view(torch.uint8))


def bad_calls_on(device: str) -> list[tuple[str, str, list[torch.Tensor], object, torch.Tensor]]:
    """(name, op, layers, block ids, packed buffer) of bad calls that mean the same on any
    device; block tables stay on the CPU, as the pool keeps them."""

    def good() -> list[torch.Tensor]:
        return [torch.arange(36, dtype=torch.float16).view(6, 2, 3).to(device) for _ in range(3)]

    def buf(layers: list[torch.Tensor], n: int) -> torch.Tensor:
        return torch.zeros(packed_nbytes(layers, n), dtype=torch.uint8, device=device)

    layers = good()
    wrong_dtype = [*layers[:2], layers[2].float()]
    noncontiguous = [layers[0], torch.zeros(6, 3, 2, dtype=torch.float16,
                                            device=device).transpose(1, 2)]
    return [
        ("layer_dtype", "gather", wrong_dtype, [1], buf(layers, 1)),
        ("noncontiguous", "gather", noncontiguous, [1], buf(layers, 1)),
        ("buf_dtype", "gather", layers, [0],
         torch.zeros(packed_nbytes(layers, 1) // 2, dtype=torch.float16, device=device)),
        ("buf_strided", "scatter", layers, [0], buf(layers, 2)[::2]),
        ("float_id_tensor", "gather", layers, torch.tensor([1.0]), buf(layers, 1)),
        ("int32_ids_out_of_range", "gather", layers,
         torch.tensor([0, 6, 2, -1], dtype=torch.int32), buf(layers, 4)),
        ("list_ids_out_of_range", "scatter", layers, [3, 9], buf(layers, 2)),
        ("duplicate", "scatter", layers, [4, 1, 4, 5, 1], buf(layers, 5)),
        ("too_small", "gather", layers, [0, 1], buf(layers, 2)[:-1]),
    ]


def call_error(op: str, layers: list[torch.Tensor], ids: object,
               out: torch.Tensor) -> BaseException:
    try:
        if op == "gather":
            cuda_ext.gather(layers, ids, out)  # type: ignore[arg-type]
        else:
            cuda_ext.scatter(out, layers, ids)  # type: ignore[arg-type]
    except Exception as exc:  # the typed error is what the test compares
        return exc
    raise AssertionError(f"{op} accepted a bad call")


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("index", range(len(bad_calls_on("cpu"))),
                         ids=[case[0] for case in bad_calls_on("cpu")])
def test_cuda_bad_calls_raise_the_same_typed_errors_as_cpu(cuda_backend: None,
                                                           index: int) -> None:
    _, op, cpu_layers, cpu_ids, cpu_out = bad_calls_on("cpu")[index]
    name, op, layers, ids, out = bad_calls_on("cuda")[index]
    before = [layer.clone() for layer in layers]
    out_before = out.clone()
    on_cpu = call_error(op, cpu_layers, cpu_ids, cpu_out)
    on_cuda = call_error(op, layers, ids, out)
    assert type(on_cuda) is type(on_cpu), (name, on_cpu, on_cuda)
    assert isinstance(on_cuda, cuda_ext.BlockCopyError), name
    assert vars(on_cuda) == vars(on_cpu), name
    assert str(on_cuda) == str(on_cpu), name
    torch.cuda.synchronize()
    assert torch.equal(out, out_before), "a rejected call copied bytes"
    assert all(torch.equal(a, b) for a, b in zip(layers, before, strict=True))


@needs_gpu
@pytest.mark.cuda
def test_cuda_pool_takes_cpu_block_tables_of_any_int_dtype(cuda_backend: None) -> None:
    layers = list(random_pool(8, 20, (4, 8), torch.float16, seed=9).unbind(0))
    ids = [7, 0, 19, 3]
    out = torch.empty(packed_nbytes(layers, 4), dtype=torch.uint8, device="cuda")
    expected = cuda_ext.gather(layers, ids, out).clone()
    for table in (torch.tensor(ids), torch.tensor(ids, dtype=torch.int32),
                  torch.tensor(ids, dtype=torch.int16)):
        out.zero_()
        assert torch.equal(cuda_ext.gather(layers, table, out), expected)
    with pytest.raises(InvalidBlockIdsError):
        cuda_ext.gather(layers, torch.tensor(ids, device="cuda"), out)
