"""kvhandoff.kvcache: put a model's KV cache into a pool's blocks and take it back out.

A serving engine's model keeps each layer's K and V as ``[batch, kv_heads, seq, head_dim]``;
kvhandoff moves blocks of ``block_tokens`` tokens. These helpers map one onto the other
through the pool's ``KVLayout`` (so every block order works): ``write_layer`` /
``write_cache`` at a token offset, ``read_layer`` / ``read_cache`` back, a head slice per TP
shard, ``blocks_for_tokens`` to size a request's block table. They never cast: K/V of
another dtype than the pool's is ``KVDtypeError``.

``kvhandoff.kvcache.hf`` adapts ``transformers``' ``DynamicCache`` (the optional extra
``hf``, imported lazily). Errors live in ``kvhandoff.kvcache.errors``; all are
``KVCacheError`` and are raised before any block is written.
"""

from __future__ import annotations

from kvhandoff.kvcache._blocks import (
    blocks_for_tokens,
    read_cache,
    read_layer,
    write_cache,
    write_layer,
)
from kvhandoff.kvcache.errors import (
    BlockTableError,
    KVCacheError,
    KVDeviceError,
    KVDtypeError,
    KVShapeError,
    MissingExtraError,
)
from kvhandoff.kvcache.hf import cache_kv, read_dynamic_cache, write_dynamic_cache

__all__ = [
    "BlockTableError",
    "KVCacheError",
    "KVDeviceError",
    "KVDtypeError",
    "KVShapeError",
    "MissingExtraError",
    "blocks_for_tokens",
    "cache_kv",
    "read_cache",
    "read_dynamic_cache",
    "read_layer",
    "write_cache",
    "write_dynamic_cache",
    "write_layer",
]
