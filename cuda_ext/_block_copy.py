"""Public gather/scatter: pick the backend for the layers' device and call it.

Backends: ``"cuda"`` (the compiled extension's CUDA kernel, tensors on a GPU), ``"cpp"`` (its
C++ CPU kernel) and ``"torch"`` (:mod:`._reference`). All three produce identical bytes and
raise identical typed errors, before copying anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from . import _loader
from ._checks import BlockIds, as_block_ids, check_call
from ._reference import gather_ref, scatter_ref
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
    uint8 tensor on the layers' device with at least ``packed_nbytes(layers, len(block_ids))``
    bytes. Layout is tensor-major: all chosen blocks of ``layers[0]`` in ``block_ids`` order,
    then those of ``layers[1]``, and so on; blocks are copied as raw bytes (fp8 included).

    Returns the used prefix view of ``out``. On a GPU the copy is queued on the current
    stream (one kernel launch) and the call returns without waiting for it. Raises a
    :class:`~kvhandoff.cuda_ext.errors.BlockCopyError` subclass, before copying anything,
    for mismatched or non-contiguous layers, a bad buffer, out-of-range ids or a short buffer.
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

    Same arguments and errors as :func:`gather`, plus
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


def backend(device: torch.device | str | None = None) -> str:
    """Which implementation ``gather``/``scatter`` use for tensors on ``device``: ``"cuda"``,
    ``"cpp"`` or ``"torch"``. ``device`` defaults to ``cuda`` when torch sees a GPU, else
    ``cpu``. Builds the extension on first use (and warns once if it falls back)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if _compiled_for(resolved) is None:
        return "torch"
    return "cuda" if resolved.type == "cuda" else "cpp"
