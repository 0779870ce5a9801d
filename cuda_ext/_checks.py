"""Validation shared by every backend: the one place that decides which typed error a bad call
raises.

The torch reference runs these checks before copying. The compiled extension repeats them in
C++ (cheap, no Python per layer) and, when one fails, the caller re-runs these to raise the
same typed error; so both backends raise identical exceptions, and always before any copy.

Order of checks (the first failing one wins): the layer list (non-empty, at least 1-D), each
layer against ``layers[0]`` (dtype, device, shape, contiguity), the packed buffer (uint8, 1-D,
contiguous, same device), the block ids (range, then duplicates for scatter), the buffer size
(exactly ``packed_nbytes``: a longer buffer is refused too, since its tail would be bytes no
block accounts for). ``copy_blocks``: each side's layers as above, then the sides against
each other, the ids of each side (range; duplicates for the destination), their counts.
``copy_regions``: each side's form, then the byte totals, then that every region lies in one
of its side's owner tensors. Both: that no destination byte is also a source byte (checked
only when the two sides share a storage, the only way they can overlap).
"""

from __future__ import annotations

import array
import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np
import torch

from .errors import (
    BlockCopySidesError,
    BlockIdOutOfRangeError,
    BufferSizeError,
    DuplicateBlockIdError,
    InvalidBlockIdsError,
    InvalidRegionsError,
    LayerMismatchError,
    NonContiguousLayerError,
    OverlappingCopyError,
    PackedBufferError,
    RegionSizeMismatchError,
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
    if buf.numel() != needed:
        raise BufferSizeError(needed, buf.numel())
    return spec, needed


def check_copy_blocks(
    src_layers: Sequence[torch.Tensor], src_ids: torch.Tensor,
    dst_layers: Sequence[torch.Tensor], dst_ids: torch.Tensor,
) -> LayerSpec:
    """Run every check of one ``copy_blocks`` call, in the documented order; return the
    source's layer spec."""
    src = check_layers(src_layers)
    dst = check_layers(dst_layers)
    if len(src_layers) != len(dst_layers):
        raise BlockCopySidesError("count", len(src_layers), len(dst_layers))
    if src.shape[1:] != dst.shape[1:]:
        raise BlockCopySidesError("block_shape", list(src.shape[1:]), list(dst.shape[1:]))
    if src.dtype != dst.dtype:
        raise BlockCopySidesError("dtype", src.dtype, dst.dtype)
    if src.device != dst.device:
        raise BlockCopySidesError("device", src.device, dst.device)
    check_block_ids(src_ids, src.num_blocks, unique=False)
    check_block_ids(dst_ids, dst.num_blocks, unique=True)
    if src_ids.numel() != dst_ids.numel():
        raise BlockCopySidesError("num_ids", src_ids.numel(), dst_ids.numel())
    if share_storage(src_layers, dst_layers):
        block = src.block_nbytes
        check_no_overlap(*_block_ranges(src_layers, src_ids, block),
                         *_block_ranges(dst_layers, dst_ids, block))
    return src


def share_storage(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    """Whether a tensor of ``a`` and one of ``b`` lie in the same storage (only then can a
    copy between them overlap; tensors on other devices never do)."""
    mine = {storage_span(t)[0] for t in a if t.device == b[0].device}
    return any(storage_span(t)[0] in mine for t in b)


def _block_ranges(layers: Sequence[torch.Tensor], ids: torch.Tensor,
                  block_nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(addresses, lengths)`` of blocks ``ids`` of every layer, as uint64 arrays."""
    bases = np.array([layer.data_ptr() for layer in layers], dtype=np.uint64)
    offsets = ids.numpy().astype(np.uint64) * np.uint64(block_nbytes)
    starts = (bases[:, None] + offsets[None, :]).reshape(-1)
    return starts, np.full(starts.size, block_nbytes, dtype=np.uint64)


def check_no_overlap(src_addresses: np.ndarray, src_lengths: np.ndarray,
                     dst_addresses: np.ndarray, dst_lengths: np.ndarray) -> None:
    """``OverlappingCopyError`` when a non-empty source range intersects a non-empty
    destination range. The destination ranges are disjoint (one byte is written once);
    the source ranges may repeat."""
    keep = dst_lengths > 0
    d_start = dst_addresses[keep]
    order = np.argsort(d_start, kind="stable")
    d_start = d_start[order]
    d_end = d_start + dst_lengths[keep][order]
    s_keep = src_lengths > 0
    s_start, s_end = src_addresses[s_keep], src_addresses[s_keep] + src_lengths[s_keep]
    if d_start.size == 0 or s_start.size == 0:
        return
    # The last destination range starting before each source range ends is the only one
    # that can overlap it, since the destination ranges are disjoint and sorted.
    last = np.searchsorted(d_start, s_end, side="left").astype(np.int64) - 1
    clipped = np.maximum(last, 0)
    hit = (last >= 0) & (d_end[clipped] > s_start)
    if bool(hit.any()):
        k = int(np.flatnonzero(hit)[0])
        j = int(clipped[k])
        low = max(int(s_start[k]), int(d_start[j]))
        high = min(int(s_end[k]), int(d_end[j]))
        raise OverlappingCopyError(low, high - low)


class RegionList(Protocol):
    """What ``copy_regions`` reads of one side: ``kvhandoff.engine.transports.Regions`` is
    one. ``addresses`` and ``lengths`` are 1-D ``uint64`` arrays of one length; the regions,
    back to back, are the side's byte stream; each lies inside one tensor of ``owners``."""

    @property
    def addresses(self) -> np.ndarray: ...

    @property
    def lengths(self) -> np.ndarray: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def owners(self) -> tuple[torch.Tensor, ...]: ...


def storage_span(tensor: torch.Tensor) -> tuple[int, int]:
    """``(first byte address, byte count)`` of the storage ``tensor`` lies in."""
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _check_region_form(regions: RegionList, side: str) -> int:
    """Check one side's arrays, device and owners; return its byte total."""
    addresses = getattr(regions, "addresses", None)
    lengths = getattr(regions, "lengths", None)
    for name, value in (("addresses", addresses), ("lengths", lengths)):
        if not isinstance(value, np.ndarray) or value.dtype != np.uint64 or value.ndim != 1:
            got = (f"{value.dtype} array of {value.ndim} dimensions"
                   if isinstance(value, np.ndarray) else type(value).__name__)
            raise InvalidRegionsError(side, f"{name} must be a 1-D uint64 array, got {got}")
    assert addresses is not None and lengths is not None
    if addresses.shape != lengths.shape:
        raise InvalidRegionsError(
            side, f"{addresses.size} addresses but {lengths.size} lengths")
    if not isinstance(getattr(regions, "device", None), torch.device):
        raise InvalidRegionsError(side, "device must be a torch.device")
    owners = getattr(regions, "owners", None)
    if not isinstance(owners, tuple) or not all(isinstance(o, torch.Tensor) for o in owners):
        raise InvalidRegionsError(side, "owners must be a tuple of tensors")
    if any(o.device != regions.device for o in owners):
        raise InvalidRegionsError(side, f"an owner tensor is not on {regions.device}")
    return int(lengths.sum(dtype=np.uint64))


def owner_spans(regions: RegionList, side: str) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The owners' storages as sorted ``(address, nbytes)`` spans, and for every region the
    index of the span holding all of it (any index for an empty region).
    ``InvalidRegionsError`` for a non-empty region outside every span."""
    spans = sorted({storage_span(o) for o in regions.owners})
    addresses, lengths = regions.addresses, regions.lengths
    starts = np.array([s for s, _ in spans] or [0], dtype=np.uint64)
    ends = np.array([s + n for s, n in spans] or [0], dtype=np.uint64)
    found = np.searchsorted(starts, addresses, side="right").astype(np.int64) - 1
    index = np.maximum(found, 0)
    inside = (found >= 0) & (addresses + lengths <= ends[index])
    inside |= lengths == 0
    if not bool(inside.all()):
        bad = int(np.flatnonzero(~inside)[0])
        raise InvalidRegionsError(
            side, f"region {bad} (address {int(addresses[bad]):#x}, {int(lengths[bad])} bytes) "
            "lies outside every owner tensor")
    return spans, index


def check_regions(src: RegionList, dst: RegionList) -> int:
    """Run every check of one ``copy_regions`` call, in the documented order; return the
    number of bytes it moves."""
    src_nbytes = _check_region_form(src, "source")
    dst_nbytes = _check_region_form(dst, "destination")
    if src_nbytes != dst_nbytes:
        raise RegionSizeMismatchError(src_nbytes, dst_nbytes)
    src_spans, _ = owner_spans(src, "source")
    dst_spans, _ = owner_spans(dst, "destination")
    if src.device == dst.device and set(src_spans) & set(dst_spans):
        check_no_overlap(src.addresses, src.lengths, dst.addresses, dst.lengths)
    return src_nbytes
