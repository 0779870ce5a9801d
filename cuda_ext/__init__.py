"""kvhandoff.cuda_ext: pack a request's KV blocks of every layer into one contiguous buffer
(``gather``) and unpack them (``scatter``), copy blocks of one set of layers straight into
blocks of another (``copy_blocks``), and copy one list of byte regions over another
(``copy_regions``, what a block-to-block transport moves), each in one call: one CUDA kernel
launch on a GPU, one parallel loop on the CPU, a readable torch reference everywhere else.

The compiled extension is JIT-built on first use, never at import (see ``_loader`` for
``KVHANDOFF_BLOCK_COPY`` and ``KVHANDOFF_CACHE_DIR``). ``backend()`` says which implementation
is active; ``gather_ref``/``scatter_ref``/``copy_blocks_ref``/``copy_regions_ref`` are the torch
reference the kernels are tested
against; ``packed_nbytes`` sizes the packed buffer. Every error is a ``BlockCopyError``.
"""

from __future__ import annotations

from ._block_copy import backend, copy_blocks, copy_regions, gather, scatter
from ._checks import RegionList, packed_nbytes
from ._loader import BACKEND_ENV, CACHE_ENV
from ._reference import copy_blocks_ref, copy_regions_ref, gather_ref, scatter_ref
from .errors import (
    BlockCopyConfigError,
    BlockCopyError,
    BlockCopyFallbackWarning,
    BlockCopySidesError,
    BlockIdOutOfRangeError,
    BufferSizeError,
    DuplicateBlockIdError,
    ExtensionUnavailableError,
    InvalidBlockIdsError,
    InvalidRegionsError,
    LayerMismatchError,
    NonContiguousLayerError,
    OverlappingCopyError,
    PackedBufferError,
    RegionSizeMismatchError,
)

__all__ = [
    "BACKEND_ENV",
    "CACHE_ENV",
    "BlockCopyConfigError",
    "BlockCopyError",
    "BlockCopyFallbackWarning",
    "BlockCopySidesError",
    "BlockIdOutOfRangeError",
    "BufferSizeError",
    "DuplicateBlockIdError",
    "ExtensionUnavailableError",
    "InvalidBlockIdsError",
    "InvalidRegionsError",
    "LayerMismatchError",
    "NonContiguousLayerError",
    "OverlappingCopyError",
    "PackedBufferError",
    "RegionList",
    "RegionSizeMismatchError",
    "backend",
    "copy_blocks",
    "copy_blocks_ref",
    "copy_regions",
    "copy_regions_ref",
    "gather",
    "gather_ref",
    "packed_nbytes",
    "scatter",
    "scatter_ref",
]
