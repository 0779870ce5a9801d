"""Validation shared by every backend: the one place that decides which typed error a bad call
raises.

The torch reference runs these checks before copying. The compiled extension repeats them in
C++ (cheap, no Python per layer) and, when one fails, the caller re-runs these to raise the
same typed error; so both backends raise identical exceptions, and always before any copy.

Order of checks (the first failing one wins): the layer list (non-empty, at least 1-D), each
layer against ``layers[0]`` (dtype, device, shape, contiguity), the packed buffer (uint8, 1-D,
contiguous, same device), the block ids (range, then duplicates for scatter), the buffer size.
"""

from __future__ import annotations

import array
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .errors import (
    BlockIdOutOfRangeError,
    BufferTooSmallError,
    DuplicateBlockIdError,
    InvalidBlockIdsError,
    LayerMismatchError,
    NonContiguousLayerError,
    PackedBufferError,
)

BlockIds = Sequence[int] | torch.Tensor


class LayerSpec(NamedTuple):
    """What every layer tensor of one call shares."""

    dtype: torch.dtype
    device: torch.device
    shape: torch.Size
    num_blocks: int
    block_nbytes: int


def check_layers(layers: Sequence[torch.Tensor]) -> LayerSpec:
    """Check that ``layers`` is a non-empty list of contiguous tensors of one dtype, device and
    shape ``[num_blocks, *block_shape]``; return what they share."""
    if len(layers) == 0:
        raise LayerMismatchError(None, "count", "at least one tensor", 0)
    first = layers[0]
    if not isinstance(first, torch.Tensor):
        raise LayerMismatchError(0, "type", "torch.Tensor", type(first).__name__)
    if first.dim() == 0:
        raise LayerMismatchError(0, "shape", "at least 1 dimension [num_blocks, ...]", [])
    dtype, device, shape = first.dtype, first.device, first.shape
    for index, layer in enumerate(layers):
        if not isinstance(layer, torch.Tensor):
            raise LayerMismatchError(index, "type", "torch.Tensor", type(layer).__name__)
        if layer.dtype != dtype:
            raise LayerMismatchError(index, "dtype", dtype, layer.dtype)
        if layer.device != device:
            raise LayerMismatchError(index, "device", device, layer.device)
        if layer.shape != shape:
            raise LayerMismatchError(index, "shape", list(shape), list(layer.shape))
        if not layer.is_contiguous():
            raise NonContiguousLayerError(index, tuple(layer.shape), tuple(layer.stride()))
    block_nbytes = math.prod(shape[1:]) * first.element_size()
    return LayerSpec(dtype, device, shape, shape[0], block_nbytes)


def packed_nbytes(layers: Sequence[torch.Tensor], n_blocks: int) -> int:
    """Bytes that ``gather(layers, ids, out)`` writes (and ``scatter`` reads) for ``n_blocks``
    block ids: ``len(layers) * n_blocks * block_nbytes``. Validates ``layers`` like gather."""
    spec = check_layers(layers)
    return len(layers) * n_blocks * spec.block_nbytes


def as_block_ids(block_ids: BlockIds) -> torch.Tensor:
    """Return ``block_ids`` as a contiguous 1-D int64 CPU tensor (no copy when it already is
    one). Floats, bools of a tensor, GPU tensors and nested lists are rejected."""
    if isinstance(block_ids, torch.Tensor):
        if block_ids.device.type != "cpu":
            raise InvalidBlockIdsError(f"a tensor on {block_ids.device}")
        if block_ids.dim() != 1:
            raise InvalidBlockIdsError(f"a {block_ids.dim()}-D tensor")
        if block_ids.dtype.is_floating_point or block_ids.dtype.is_complex or (
            block_ids.dtype == torch.bool
        ):
            raise InvalidBlockIdsError(f"a {block_ids.dtype} tensor")
        return block_ids.to(torch.int64).contiguous()
    if isinstance(block_ids, (str, bytes)):
        raise InvalidBlockIdsError(type(block_ids).__name__)
    try:
        # array('q') refuses floats and non-integers (torch.tensor would truncate 1.5 to 1)
        # and converts a list several times faster than torch.tensor does.
        packed = array.array("q", block_ids)
    except (TypeError, OverflowError) as exc:
        raise InvalidBlockIdsError(f"{type(block_ids).__name__} ({exc})") from None
    if len(packed) == 0:
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(packed, dtype=torch.int64)


def check_buffer(buf: torch.Tensor, device: torch.device) -> None:
    """Check that the packed buffer is a contiguous 1-D uint8 tensor on ``device``."""
    if not isinstance(buf, torch.Tensor):
        raise PackedBufferError("type", "torch.Tensor", type(buf).__name__)
    if buf.dtype != torch.uint8:
        raise PackedBufferError("dtype", torch.uint8, buf.dtype)
    if buf.dim() != 1:
        raise PackedBufferError("dim", 1, buf.dim())
    if not buf.is_contiguous():
        raise PackedBufferError("contiguous", True, False)
    if buf.device != device:
        raise PackedBufferError("device", device, buf.device)


def check_block_ids(ids: torch.Tensor, num_blocks: int, *, unique: bool) -> None:
    """Check that every id is in ``[0, num_blocks)`` and, when ``unique``, that none repeats."""
    if ids.numel() == 0:
        return
    low, high = torch.aminmax(ids)
    if int(low) < 0 or int(high) >= num_blocks:
        bad = ids[(ids < 0) | (ids >= num_blocks)]
        raise BlockIdOutOfRangeError(bad.tolist(), num_blocks)
    if unique:
        values, counts = torch.unique(ids, return_counts=True)
        if bool((counts > 1).any()):
            raise DuplicateBlockIdError(values[counts > 1].tolist())


def check_call(
    layers: Sequence[torch.Tensor], ids: torch.Tensor, buf: torch.Tensor, *, scatter: bool
) -> tuple[LayerSpec, int]:
    """Run every check of one gather (``scatter=False``) or scatter call, in the documented
    order; return the layer spec and the number of packed bytes the call uses."""
    spec = check_layers(layers)
    check_buffer(buf, spec.device)
    check_block_ids(ids, spec.num_blocks, unique=scatter)
    needed = len(layers) * ids.numel() * spec.block_nbytes
    if buf.numel() < needed:
        raise BufferTooSmallError(needed, buf.numel())
    return spec, needed
