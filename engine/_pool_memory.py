"""Where a ``BlockPool``'s memory comes from: allocated by the pool (``zeroed_layer``, with
transparent huge-page advice on a Linux CPU) or adopted from the host's own tensors
(``adopted_layers``: views, no copy, every tensor checked; ``check_against``: the views
against the ``KVLayout`` the host says they hold). The pool's books (``pool.py``) start from
the layer list these give.
"""

from __future__ import annotations

import ctypes
import itertools
import sys
from typing import Any

import torch
from kvhandoff.engine.errors import AdoptError, LayoutMismatchError
from kvhandoff.engine.layout import KVLayout

__all__ = ["adopted_layers", "check_against", "zeroed_layer"]

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


def zeroed_layer(shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """A zeroed layer tensor. On a Linux CPU the memory is advised into transparent huge
    pages before its first touch: a pool is large and long-lived, and the transports that
    copy between processes (cross-memory attach, NIXL over cma) pin every page they move,
    so 4 KiB pages cost them a third or more of their bandwidth. Advice only: ignored where
    the kernel or the platform does not take it."""
    layer = torch.empty(shape, dtype=dtype, device=device)
    if device.type == "cpu" and layer.nbytes >= 2 * _HUGE_PAGE and sys.platform == "linux":
        start = -(-layer.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (layer.data_ptr() + layer.nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                             ctypes.c_int(_MADV_HUGEPAGE))
            except (OSError, AttributeError):
                pass
    return layer.zero_()


def adopted_layers(tensors: Any) -> list[torch.Tensor]:
    """The flat ``[K0, V0, ...]`` views of the host's tensors (``BlockPool.from_tensors``),
    every one checked; ``AdoptError`` names the first tensor and property that is wrong."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise AdoptError(None, "type", "a list of tensors: [K0, V0, ...] or one "
                         "[2, num_blocks, ...] tensor per layer", type(tensors).__name__)
    if not tensors:
        raise AdoptError(None, "count", "at least one tensor", 0)
    first = tensors[0]
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise AdoptError(index, "type", "a torch.Tensor", type(tensor).__name__)
        if tensor.dtype != first.dtype:
            raise AdoptError(index, "dtype", first.dtype, tensor.dtype)
        if tensor.device != first.device:
            raise AdoptError(index, "device", first.device, tensor.device)
        if tensor.shape != first.shape:
            raise AdoptError(index, "shape", tuple(first.shape), tuple(tensor.shape))
        if tensor.requires_grad:
            raise AdoptError(index, "requires_grad", False, True)
    shape = tuple(first.shape)
    layers: list[torch.Tensor] = []
    if len(shape) == 4:  # [K0, V0, K1, V1, ...]
        if len(tensors) % 2:
            raise AdoptError(None, "count", "an even number of [num_blocks, ...] tensors "
                             "(K and V of each layer)", len(tensors))
        layers = list(tensors)
    elif len(shape) == 5 and shape[0] == 2:  # per layer [2, num_blocks, ...]: K = t[0]
        for tensor in tensors:
            layers += [tensor[0], tensor[1]]
    elif len(shape) == 5 and shape[1] == 2:
        raise AdoptError(0, "interleaved", "K and V as separate block tensors "
                         "([2, num_blocks, ...] per layer): K and V interleaved per block "
                         "([num_blocks, 2, ...]) give strided layer views, and the block "
                         "copy moves contiguous layer tensors only", shape)
    else:
        raise AdoptError(0, "shape", "[num_blocks, *block_shape] or "
                         "[2, num_blocks, *block_shape]", shape)
    per_layer = len(shape) == 5  # which host tensor a layer view comes from, for errors
    for index, layer in enumerate(layers):
        source = index // 2 if per_layer else index
        if not layer.is_contiguous():
            raise AdoptError(source, "contiguous", "a contiguous tensor",
                             f"strides {tuple(layer.stride())}")
        if layer.numel() == 0:
            raise AdoptError(source, "shape", "no zero-sized dimension", shape)
    # Two layer views over the same bytes would make one layer's write another's data. Sorted
    # by start, some two spans overlap exactly when some neighbours do.
    spans = sorted((layer.data_ptr(), layer.data_ptr() + layer.numel() * layer.element_size(),
                    index) for index, layer in enumerate(layers))
    for (_, end, index), (start, _, other) in itertools.pairwise(spans):
        if start < end:
            low, high = sorted((index, other))
            raise AdoptError(high // 2 if per_layer else high, "overlap",
                             "tensors over disjoint memory",
                             f"layer views {low} and {high} share memory")
    return layers


def check_against(layout: KVLayout, layers: list[torch.Tensor]) -> None:
    """``LayoutMismatchError`` unless the adopted layer views are what ``layout`` says."""
    first = layers[0]
    found: list[tuple[str, Any, Any]] = []
    if len(layers) // 2 != layout.num_layers:
        found.append(("num_layers", layout.num_layers, len(layers) // 2))
    if first.dtype != layout.dtype:
        found.append(("dtype", str(layout.dtype).removeprefix("torch."),
                      str(first.dtype).removeprefix("torch.")))
    names = ("block_tokens", "kv_heads", "head_dim")
    if layout.order == "HND":
        names = ("kv_heads", "block_tokens", "head_dim")
    for name, want, got in zip(names, layout.block_shape, first.shape[1:], strict=True):
        if want != got:
            found.append((name, want, got))
    if found:
        order = list(layout.describe())
        found.sort(key=lambda f: order.index(f[0]))
        raise LayoutMismatchError(found, "layout", "tensors")
