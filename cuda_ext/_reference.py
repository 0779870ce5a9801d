"""The pure-torch block copy: the readable definition of gather/scatter.

Tests compare the compiled kernels against these functions byte for byte, and they are what
``gather``/``scatter`` run when the extension cannot be built or ``KVHANDOFF_BLOCK_COPY=torch``.

Packed layout (tensor-major): for layers ``L0..Lk`` and block ids ``b0..bn``,
``packed = [L0[b0] L0[b1] ... L0[bn]][L1[b0] ...]...`` with each block as its raw bytes, so one
tensor's blocks are one contiguous byte range (the layer-wise path packs sub-lists of layers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import BlockIds, as_block_ids, check_call


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
