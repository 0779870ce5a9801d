"""The pure-torch block copy: the readable definition of gather/scatter, copy_blocks and
copy_regions.

Tests compare the compiled kernels against these functions byte for byte, and they are what
the public functions run when the extension cannot be built or ``KVHANDOFF_BLOCK_COPY=torch``.

Packed layout (tensor-major): for layers ``L0..Lk`` and block ids ``b0..bn``,
``packed = [L0[b0] L0[b1] ... L0[bn]][L1[b0] ...]...`` with each block as its raw bytes, so one
tensor's blocks are one contiguous byte range (the layer-wise path packs sub-lists of layers).

``copy_blocks`` is a gather followed by a scatter without the buffer in between; a region copy
is the source regions' bytes back to back (one stream) written over the destination regions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import (
    BlockIds,
    RegionList,
    as_block_ids,
    check_call,
    check_copy_blocks,
    check_regions,
    owner_spans,
    storage_span,
)


def _block_bytes(layer: torch.Tensor, num_blocks: int, block_nbytes: int) -> torch.Tensor:
    """A ``[num_blocks, block_nbytes]`` uint8 view of a contiguous layer (any dtype, fp8
    included: blocks are copied as bytes, never converted)."""
    return layer.view(torch.uint8).view(num_blocks, block_nbytes)


def gather_ref(
    layers: Sequence[torch.Tensor], block_ids: BlockIds, out: torch.Tensor
) -> torch.Tensor:
    """Pack blocks ``block_ids`` of every tensor in ``layers`` into ``out`` (tensor-major) and
    return the used prefix ``out[:packed_nbytes(layers, len(block_ids))]``. Raises the typed
    errors of ``kvhandoff.cuda_ext.errors`` before copying anything."""
    layers = list(layers)
    ids = as_block_ids(block_ids)
    spec, needed = check_call(layers, ids, out, scatter=False)
    used = out[:needed]
    if needed == 0:
        return used
    index = ids.to(spec.device)
    packed = used.view(len(layers), ids.numel(), spec.block_nbytes)
    for i, layer in enumerate(layers):
        source = _block_bytes(layer, spec.num_blocks, spec.block_nbytes)
        torch.index_select(source, 0, index, out=packed[i])
    return used


def scatter_ref(buf: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: BlockIds) -> None:
    """Inverse of :func:`gather_ref`: write the packed blocks in ``buf`` (tensor-major) back to
    blocks ``block_ids`` of every tensor in ``layers``. Duplicate destination ids are refused.
    Raises the typed errors of ``kvhandoff.cuda_ext.errors`` before copying anything."""
    layers = list(layers)
    ids = as_block_ids(block_ids)
    spec, needed = check_call(layers, ids, buf, scatter=True)
    if needed == 0:
        return
    index = ids.to(spec.device)
    packed = buf[:needed].view(len(layers), ids.numel(), spec.block_nbytes)
    for i, layer in enumerate(layers):
        destination = _block_bytes(layer, spec.num_blocks, spec.block_nbytes)
        destination.index_copy_(0, index, packed[i])


def copy_blocks_ref(
    src_layers: Sequence[torch.Tensor], src_ids: BlockIds,
    dst_layers: Sequence[torch.Tensor], dst_ids: BlockIds,
) -> None:
    """Copy block ``src_ids[j]`` of ``src_layers[t]`` to block ``dst_ids[j]`` of
    ``dst_layers[t]``, for every ``t`` and ``j``: the bytes ``gather`` of the source would pack,
    scattered to the destination. Raises the typed errors of ``kvhandoff.cuda_ext.errors``
    before copying anything."""
    src_layers, dst_layers = list(src_layers), list(dst_layers)
    src_index, dst_index = as_block_ids(src_ids), as_block_ids(dst_ids)
    spec = check_copy_blocks(src_layers, src_index, dst_layers, dst_index)
    if src_index.numel() == 0:
        return
    dst_num_blocks = dst_layers[0].shape[0]
    src_index, dst_index = src_index.to(spec.device), dst_index.to(spec.device)
    for src, dst in zip(src_layers, dst_layers, strict=True):
        blocks = _block_bytes(src, spec.num_blocks, spec.block_nbytes).index_select(0, src_index)
        _block_bytes(dst, dst_num_blocks, spec.block_nbytes).index_copy_(0, dst_index, blocks)


def _region_views(regions: RegionList, side: str) -> list[torch.Tensor]:
    """One uint8 view per region, into the storage of the owner that holds it."""
    spans, index = owner_spans(regions, side)
    by_span = {storage_span(owner): owner for owner in regions.owners}
    storages = []
    for span in spans:
        whole = torch.empty(0, dtype=torch.uint8, device=regions.device)
        storages.append(whole.set_(by_span[span].untyped_storage()))
    views = []
    for address, length, k in zip(regions.addresses.tolist(), regions.lengths.tolist(),
                                  index.tolist(), strict=True):
        if length:
            start = address - spans[k][0]
            views.append(storages[k][start:start + length])
    return views


def copy_regions_ref(src: RegionList, dst: RegionList) -> None:
    """Write the bytes of the ``src`` regions, back to back, over the ``dst`` regions in
    order (the two may cut the stream at different places, and lie on different devices).
    Raises the typed errors of ``kvhandoff.cuda_ext.errors`` before copying anything."""
    if check_regions(src, dst) == 0:
        return
    sources = _region_views(src, "source")
    stream = torch.cat(sources) if len(sources) > 1 else sources[0]
    offset = 0
    for view in _region_views(dst, "destination"):
        view.copy_(stream[offset:offset + view.numel()])
        offset += view.numel()
