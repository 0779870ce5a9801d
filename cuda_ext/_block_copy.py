"""Public gather/scatter/copy_blocks/copy_regions: pick the backend for the device and call it.

Backends: ``"cuda"`` (the compiled extension's CUDA kernel, tensors on a GPU), ``"cpp"`` (its
C++ CPU kernel) and ``"torch"`` (:mod:`._reference`). All three produce identical bytes and
raise identical typed errors, before copying anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch

from . import _loader
from ._checks import (
    BlockIds,
    RegionList,
    as_block_ids,
    check_call,
    check_copy_blocks,
    check_regions,
    share_storage,
)
from ._reference import copy_blocks_ref, copy_regions_ref, gather_ref, scatter_ref
from .errors import BlockCopyError, ExtensionUnavailableError


def _compiled_for(device: torch.device) -> ModuleType | None:
    """The extension module if it handles ``device`` under the current mode, else None."""
    mode = _loader.mode()
    if mode == "torch":
        return None
    module = _loader.extension(required=mode == "cpp")
    if module is None:
        return None
    if device.type == "cpu" or (device.type == "cuda" and module.with_cuda()):
        return module
    reason = f"the extension has no kernel for {device.type} tensors"
    if device.type == "cuda":
        reason += " (it was built without CUDA: set CUDA_HOME to the CUDA toolkit)"
    if mode == "cpp":
        raise ExtensionUnavailableError(reason)
    _loader.warn_once(
        f"device:{device.type}", f"kvhandoff block copy uses torch for {device.type}: {reason}"
    )
    return None


def _explain(
    layers: list[torch.Tensor], ids: torch.Tensor, buf: torch.Tensor, *, scatter: bool
) -> None:
    """After the extension refused a call: raise the typed error our checks find, without the
    C++ message as context. The C++ checks only say "something is wrong" (and copied
    nothing); if ours find nothing, the failure was not a validation one and the caller
    re-raises it as it is."""
    try:
        check_call(layers, ids, buf, scatter=scatter)
    except BlockCopyError as typed:
        raise typed from None


def _first_device(layers: Sequence[torch.Tensor]) -> torch.device | None:
    first = layers[0] if len(layers) else None
    return first.device if isinstance(first, torch.Tensor) else None


def gather(layers: Sequence[torch.Tensor], block_ids: BlockIds, out: torch.Tensor) -> torch.Tensor:
    """Pack blocks ``block_ids`` of every tensor in ``layers`` into ``out`` in one call.

    ``layers``: tensors of one dtype, device and shape ``[num_blocks, *block_shape]``, each
    contiguous (the pool's flat ``[K0, V0, K1, V1, ...]`` list or any sub-list of it).
    ``block_ids``: a sequence of ints or a 1-D integer CPU tensor. ``out``: a contiguous 1-D
    uint8 tensor on the layers' device of exactly ``packed_nbytes(layers, len(block_ids))``
    bytes (slice a larger buffer: a tail no block fills would be sent as stale bytes).
    Layout is tensor-major: all chosen blocks of ``layers[0]`` in ``block_ids`` order, then
    those of ``layers[1]``, and so on; blocks are copied as raw bytes (fp8 included).

    Returns ``out``. On a GPU the copy is queued on the current stream (one kernel launch)
    and the call returns without waiting for it. Raises a
    :class:`~kvhandoff.cuda_ext.errors.BlockCopyError` subclass, before copying anything,
    for mismatched or non-contiguous layers, a bad buffer, out-of-range ids or a buffer of
    another size.
    """
    layers = list(layers)
    device = _first_device(layers)
    module = _compiled_for(device) if device is not None else None
    if module is None:
        return gather_ref(layers, block_ids, out)
    ids = as_block_ids(block_ids)
    try:
        result: torch.Tensor = module.gather(layers, ids, out)
    except Exception:
        _explain(layers, ids, out, scatter=False)
        raise
    return result


def scatter(buf: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: BlockIds) -> None:
    """Inverse of :func:`gather`: write the packed blocks in ``buf`` (tensor-major, as
    ``gather`` produced them) to blocks ``block_ids`` of every tensor in ``layers``.

    Same arguments and errors as :func:`gather` (``buf`` of exactly ``packed_nbytes`` bytes:
    a longer one is refused, not read as a prefix), plus
    :class:`~kvhandoff.cuda_ext.errors.DuplicateBlockIdError` when a destination id repeats.
    On a GPU the copy is queued on the current stream.
    """
    layers = list(layers)
    device = _first_device(layers)
    module = _compiled_for(device) if device is not None else None
    if module is None:
        scatter_ref(buf, layers, block_ids)
        return
    ids = as_block_ids(block_ids)
    try:
        module.scatter(buf, layers, ids)
    except Exception:
        _explain(layers, ids, buf, scatter=True)
        raise


def copy_blocks(
    src_layers: Sequence[torch.Tensor], src_ids: BlockIds,
    dst_layers: Sequence[torch.Tensor], dst_ids: BlockIds,
) -> None:
    """Copy block ``src_ids[j]`` of every ``src_layers[t]`` to block ``dst_ids[j]`` of
    ``dst_layers[t]`` in one pass (what a gather of the source and a scatter into the
    destination do, without the buffer in between): one kernel launch on a GPU, one
    parallel loop on the CPU.

    Each side is a layer list as :func:`gather` takes; the two must have as many tensors, one
    block shape, dtype and device, and as many ids. Raises, before copying anything,
    :class:`~kvhandoff.cuda_ext.errors.BlockCopySidesError` when the sides differ, the layer
    and id errors of :func:`gather` for either side,
    :class:`~kvhandoff.cuda_ext.errors.DuplicateBlockIdError` for a repeated destination id
    and :class:`~kvhandoff.cuda_ext.errors.OverlappingCopyError` when a destination block is
    also read (sides in one storage). On a GPU the copy is queued on the current stream.
    """
    src_layers, dst_layers = list(src_layers), list(dst_layers)
    device = _first_device(src_layers)
    module = _compiled_for(device) if device is not None else None
    if module is None:
        copy_blocks_ref(src_layers, src_ids, dst_layers, dst_ids)
        return
    sids, dids = as_block_ids(src_ids), as_block_ids(dst_ids)
    # Overlap is checked here only (it needs the storages): run every check in Python when
    # the sides could share one, else let C++ repeat the cheap ones and explain a failure.
    if share_storage(src_layers, dst_layers):
        check_copy_blocks(src_layers, sids, dst_layers, dids)
    try:
        module.copy_blocks(src_layers, sids, dst_layers, dids)
    except Exception:
        try:
            check_copy_blocks(src_layers, sids, dst_layers, dids)
        except BlockCopyError as typed:
            raise typed from None
        raise


def _as_int64(values: np.ndarray) -> torch.Tensor:
    """A uint64 address or length array as the int64 CPU tensor the extension reads (the same
    bits; no copy for a contiguous array)."""
    return torch.from_numpy(np.ascontiguousarray(values).view(np.int64))


def copy_regions(src: RegionList, dst: RegionList) -> None:
    """Write the bytes of the ``src`` regions, back to back, over the ``dst`` regions in order,
    in one pass: the two lists may cut the byte stream at different places (a merge of the
    two lists finds the pieces). ``src`` and ``dst`` are region lists such as
    ``kvhandoff.engine.transports.Regions``: ``addresses`` and ``lengths`` (1-D uint64
    arrays), ``device`` and ``owners`` (the tensors the regions lie in).

    Raises, before copying anything, :class:`~kvhandoff.cuda_ext.errors.InvalidRegionsError`
    for a malformed side or a region outside its owners,
    :class:`~kvhandoff.cuda_ext.errors.RegionSizeMismatchError` when the totals differ and
    :class:`~kvhandoff.cuda_ext.errors.OverlappingCopyError` when the sides overlap. CPU: a
    parallel loop over equal shares of the stream. GPU: one kernel launch over the pieces,
    queued on the current stream. Sides on different devices are copied by the torch
    reference (a ``copy_`` per region).
    """
    check_regions(src, dst)
    device = src.device
    module = _compiled_for(device) if device == dst.device else None
    if module is None:
        copy_regions_ref(src, dst)
        return
    module.copy_regions(_as_int64(src.addresses), _as_int64(src.lengths),
                        _as_int64(dst.addresses), _as_int64(dst.lengths), device)


def backend(device: torch.device | str | None = None) -> str:
    """Which implementation ``gather``/``scatter``/``copy_blocks``/``copy_regions`` use for
    tensors on ``device``: ``"cuda"``, ``"cpp"`` or ``"torch"``. ``device`` defaults to
    ``cuda`` when torch sees a GPU, else ``cpu``. Builds the extension on first use (and
    warns once if it falls back)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if _compiled_for(resolved) is None:
        return "torch"
    return "cuda" if resolved.type == "cuda" else "cpp"
