"""kvhandoff.cuda_ext: pack a request's KV blocks of every layer into one contiguous buffer
(``gather``) and unpack them (``scatter``), in one call: one CUDA kernel launch on a GPU, one
parallel loop on the CPU, a readable torch reference everywhere else.

The compiled extension is JIT-built on first use, never at import (see ``_loader`` for
``KVHANDOFF_BLOCK_COPY`` and ``KVHANDOFF_CACHE_DIR``). ``backend()`` says which implementation
is active; ``gather_ref``/``scatter_ref`` are the torch reference the kernels are tested
against; ``packed_nbytes`` sizes the packed buffer. Every error is a ``BlockCopyError``.
"""

from __future__ import annotations

from ._block_copy import backend, gather, scatter
from ._checks import packed_nbytes
from ._loader import BACKEND_ENV, CACHE_ENV
from ._reference import gather_ref, scatter_ref
from .errors import (
    BlockCopyConfigError,
    BlockCopyError,
    BlockCopyFallbackWarning,
    BlockIdOutOfRangeError,
    BufferTooSmallError,
    DuplicateBlockIdError,
    ExtensionUnavailableError,
    InvalidBlockIdsError,
    LayerMismatchError,
    NonContiguousLayerError,
    PackedBufferError,
)

__all__ = [
    "BACKEND_ENV",
    "CACHE_ENV",
    "BlockCopyConfigError",
    "BlockCopyError",
    "BlockCopyFallbackWarning",
    "BlockIdOutOfRangeError",
    "BufferTooSmallError",
    "DuplicateBlockIdError",
    "ExtensionUnavailableError",
    "InvalidBlockIdsError",
    "LayerMismatchError",
    "NonContiguousLayerError",
    "PackedBufferError",
    "backend",
    "gather",
    "gather_ref",
    "packed_nbytes",
    "scatter",
    "scatter_ref",
]
