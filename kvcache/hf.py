"""``transformers`` adapter: a ``DynamicCache`` into a pool's blocks and back.

``transformers`` is the optional extra ``hf`` (``pip install 'kvhandoff[hf]'``), imported only
inside the function that needs it; writing duck-types the cache (``cache.layers[i].keys`` /
``.values``, ``[batch, kv_heads, seq, head_dim]``), so only reading, which builds a new
``DynamicCache``, imports it. A missing ``transformers`` is ``MissingExtraError``.

Only full-attention layers are written: a sliding-window layer keeps only its last window of
tokens, whose positions the cache does not say, so it is refused (``KVShapeError``).
"""

from __future__ import annotations

from typing import Any

import torch
from kvhandoff.engine import BlockPool
from kvhandoff.kvcache._blocks import BlockTable, read_cache, write_cache
from kvhandoff.kvcache.errors import KVShapeError, MissingExtraError

__all__ = ["cache_kv", "read_dynamic_cache", "write_dynamic_cache"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise MissingExtraError("transformers", "hf") from None
    return transformers


def cache_kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(keys, values)`` of every layer of a ``transformers`` cache, as they are (no
    copy); ``KVShapeError`` for a layer that is sliding-window or holds nothing yet."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise KVShapeError("cache", "a transformers Cache (with .layers)", type(cache).__name__)
    kv = []
    for index, layer in enumerate(layers):
        if getattr(layer, "is_sliding", False):
            raise KVShapeError(f"cache layer {index}", "a full-attention layer",
                               "a sliding-window layer")
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise KVShapeError(f"cache layer {index}", "keys and values (run the model "
                               "first)", type(keys).__name__)
        kv.append((keys, values))
    return kv


def write_dynamic_cache(pool: BlockPool, cache: Any, block_ids: BlockTable, *,
                        start: int = 0, heads: tuple[int, int] | None = None) -> int:
    """Write the cache's tokens ``[start, seq)`` of every layer to the same positions of the
    blocks (one block table, or one per batch row); returns ``seq``, the cache's length.
    ``start`` > 0 writes only what was added since (the earlier tokens' blocks are not
    touched). ``heads`` slices the KV heads for a TP shard (``kvhandoff.kvcache``). Every
    layer is checked before any block is written."""
    kv = cache_kv(cache)
    if len(kv) != pool.num_layers:
        raise KVShapeError("cache layers", pool.num_layers, len(kv))
    seq = kv[0][0].shape[-2] if kv else 0
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= seq:
        raise KVShapeError("start", f"an int in 0..{seq} (the cache's length)", start)
    tail = [(k[..., start:, :], v[..., start:, :]) for k, v in kv]
    write_cache(pool, tail, block_ids, start=start, heads=heads)
    return int(seq)


def read_dynamic_cache(pool: BlockPool, block_ids: BlockTable, num_tokens: int, *,
                       config: Any = None) -> Any:
    """A new ``transformers.DynamicCache`` holding token positions ``[0, num_tokens)`` of
    every layer of the blocks (one batch row per block table), ready to continue decoding
    from. ``config``: the model's config, passed to ``DynamicCache``."""
    transformers = _transformers()
    kv = read_cache(pool, block_ids, num_tokens)
    cache = transformers.DynamicCache() if config is None \
        else transformers.DynamicCache(config=config)
    for layer, (keys, values) in enumerate(kv):
        cache.update(keys, values, layer)
    return cache
