"""Write a model's per-layer K/V into a pool's blocks at a token offset, and read it back.

A model holds each layer's K and V as ``[batch, kv_heads, seq, head_dim]`` (``transformers``,
most attention kernels) or ``[seq, kv_heads, head_dim]`` (one sequence, token-major). A pool
holds them in blocks of ``block_tokens`` tokens, whose inner order the pool's ``KVLayout``
says (``NHD``: ``block[t, h]``; ``HND``: ``block[h, t]``). Token ``p`` of a sequence whose
block table is ``table`` lies in block ``table[p // block_tokens]`` at slot
``p % block_tokens``; ``KVLayout.token_index`` turns (blocks, slots) into the index for
either order, so nothing here depends on the order.

Every call is planned before it writes: shapes, dtype (never cast), device, head slice,
block table coverage, range and duplicates are checked for every layer first, so an error
leaves every block as it was. Each layer is one indexed copy per K and V (no Python step per
token or block).

Tensor parallelism: a rank's pool holds ``kv_heads`` of the model's heads. ``heads=(h0, h1)``
writes heads ``[h0, h1)`` of the model's K/V; left out, it is the layout's own shard
(``tp_rank * kv_heads`` onwards) when the K/V has ``kv_heads * tp_size`` heads.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
from kvhandoff.engine import BlockPool, KVLayout
from kvhandoff.kvcache.errors import BlockTableError, KVDeviceError, KVDtypeError, KVShapeError

__all__ = ["blocks_for_tokens", "read_cache", "read_layer", "write_cache", "write_layer"]

BlockTable = Sequence[int] | Sequence[Sequence[int]] | torch.Tensor
Form = Literal["bhsd", "shd"]


class _Plan(NamedTuple):
    """One layer's write, checked: token ``i`` goes to slot ``slots[i]`` of ``blocks[i]``."""

    layer: int
    blocks: torch.Tensor
    slots: torch.Tensor
    key: torch.Tensor  # [tokens, kv_heads, head_dim]
    value: torch.Tensor


def blocks_for_tokens(num_tokens: int, block_tokens: int | KVLayout | BlockPool) -> int:
    """How many blocks hold ``num_tokens`` tokens: ``ceil(num_tokens / block_tokens)``;
    ``block_tokens`` may be given as a pool or a layout."""
    if isinstance(block_tokens, BlockPool):
        block_tokens = block_tokens.layout.block_tokens
    elif isinstance(block_tokens, KVLayout):
        block_tokens = block_tokens.block_tokens
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
        raise KVShapeError("block_tokens", "a positive int", block_tokens)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise KVShapeError("num_tokens", "an int >= 0", num_tokens)
    return -(-num_tokens // block_tokens)


# --- block tables --------------------------------------------------------------------------


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("a bool is not a block id")
    return operator.index(value)


def _tables(block_ids: Any) -> list[list[int]]:
    """The block table(s) as one list of ids per batch row."""
    if isinstance(block_ids, torch.Tensor):
        if block_ids.dtype.is_floating_point or block_ids.dtype == torch.bool \
                or block_ids.dim() not in (1, 2):
            raise BlockTableError(f"a 1-D or 2-D integer tensor, got {block_ids.dtype} "
                                  f"of {block_ids.dim()} dimensions")
        rows = block_ids.tolist()
        return [rows] if block_ids.dim() == 1 else rows
    if not isinstance(block_ids, (list, tuple)) and callable(getattr(block_ids, "tolist", None)):
        block_ids = block_ids.tolist()  # a numpy block table (1-D or one row per sequence)
    if isinstance(block_ids, (str, bytes)) or not isinstance(block_ids, Sequence):
        raise BlockTableError(f"a sequence of block ids, got {type(block_ids).__name__}")
    nested = len(block_ids) > 0 and isinstance(block_ids[0], (Sequence, torch.Tensor))
    raw_rows = list(block_ids) if nested else [block_ids]
    try:
        return [[_int(b) for b in row] for row in raw_rows]
    except TypeError:
        raise BlockTableError("block ids must be ints (one table, or one per batch row)")\
            from None


def _positions(pool: BlockPool, block_ids: Any, batch: int, start: int, count: int, *,
               unique: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, slots) of tokens ``[start, start + count)`` of every batch row, row-major."""
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise KVShapeError("start", "an int >= 0", start)
    tables = _tables(block_ids)
    if len(tables) != batch:
        raise BlockTableError(f"{batch} batch row(s) need {batch} block table(s), got "
                              f"{len(tables)}")
    block_tokens = pool.layout.block_tokens
    needed = blocks_for_tokens(start + count, block_tokens) if count else 0
    first = start // block_tokens
    used: list[int] = []
    for table in tables:
        if len(table) < needed:
            raise BlockTableError(
                f"tokens {start}..{start + count - 1} need {needed} blocks of "
                f"{block_tokens} tokens, the table has {len(table)}", tuple(table))
        used += table[first:needed]
    bad = [b for b in used if not 0 <= b < pool.num_blocks]
    if bad:
        raise BlockTableError(f"ids outside the pool's 0..{pool.num_blocks - 1}", tuple(bad))
    if unique and len(set(used)) != len(used):
        twice = sorted(b for b, n in Counter(used).items() if n > 1)
        raise BlockTableError("a block would take two tokens' places (listed twice)",
                              tuple(twice))
    position = torch.arange(start, start + count)
    local, slots = position // block_tokens, position % block_tokens
    table_t = torch.tensor([row[:needed] for row in tables], dtype=torch.long).view(
        batch, needed)
    blocks = table_t[:, local].reshape(-1)
    return blocks.to(pool.device), slots.repeat(batch).to(pool.device)


# --- K/V tensors ---------------------------------------------------------------------------


def _token_major(name: str, tensor: Any, layout: KVLayout, device: torch.device,
                 heads: tuple[int, int] | None) -> tuple[torch.Tensor, int, int]:
    """``tensor`` as ``[batch * seq, kv_heads, head_dim]`` (the pool's heads only), with
    batch and seq."""
    if not isinstance(tensor, torch.Tensor):
        raise KVShapeError(name, "a torch.Tensor", type(tensor).__name__)
    if tensor.dim() == 4:
        batch, num_heads, seq, head_dim = tensor.shape
        token_major = tensor.transpose(1, 2)  # [batch, seq, heads, head_dim]
    elif tensor.dim() == 3:
        seq, num_heads, head_dim = tensor.shape
        batch, token_major = 1, tensor.unsqueeze(0)
    else:
        raise KVShapeError(name, "[batch, kv_heads, seq, head_dim] or [seq, kv_heads, "
                           "head_dim]", tuple(tensor.shape))
    if tensor.dtype != layout.dtype:
        raise KVDtypeError(layout.dtype, tensor.dtype)
    if tensor.device != device:
        raise KVDeviceError(device, tensor.device)
    if head_dim != layout.head_dim:
        raise KVShapeError(f"{name} head_dim", layout.head_dim, head_dim)
    h0, h1 = _head_slice(num_heads, layout, heads)
    token_major = token_major[:, :, h0:h1]
    return token_major.reshape(batch * seq, layout.kv_heads, head_dim), batch, seq


def _head_slice(num_heads: int, layout: KVLayout,
                heads: tuple[int, int] | None) -> tuple[int, int]:
    shard = layout.kv_heads
    if heads is None:
        if num_heads == shard:
            return 0, shard
        if layout.tp_size > 1 and num_heads == shard * layout.tp_size:
            return layout.tp_rank * shard, (layout.tp_rank + 1) * shard
        raise KVShapeError("heads", f"{shard} KV heads (the pool's), or heads=(h0, h1) to "
                           "write a slice", num_heads)
    if (not isinstance(heads, tuple) or len(heads) != 2
            or any(isinstance(h, bool) or not isinstance(h, int) for h in heads)):
        raise KVShapeError("heads", "a (first, stop) tuple of ints", heads)
    h0, h1 = heads
    if not 0 <= h0 < h1 <= num_heads or h1 - h0 != shard:
        raise KVShapeError("heads", f"{shard} heads within 0..{num_heads}", heads)
    return h0, h1


def _check_layer(pool: BlockPool, layer: Any) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or \
            not 0 <= layer < pool.num_layers:
        raise KVShapeError("layer", f"an index in 0..{pool.num_layers - 1}", layer)
    return layer


def _check_pool(pool: Any) -> BlockPool:
    if not isinstance(pool, BlockPool):
        raise KVShapeError("pool", "a kvhandoff BlockPool", type(pool).__name__)
    return pool


def _plan(pool: BlockPool, layer: int, key: Any, value: Any, block_ids: Any, start: int,
          heads: tuple[int, int] | None) -> _Plan:
    _check_layer(pool, layer)
    k, batch, seq = _token_major("key", key, pool.layout, pool.device, heads)
    v, v_batch, v_seq = _token_major("value", value, pool.layout, pool.device, heads)
    if (v_batch, v_seq) != (batch, seq) or tuple(key.shape) != tuple(value.shape):
        raise KVShapeError("value", f"the key's shape {tuple(key.shape)}", tuple(value.shape))
    blocks, slots = _positions(pool, block_ids, batch, start, seq, unique=True)
    return _Plan(layer, blocks, slots, k, v)


def _apply(pool: BlockPool, plans: Sequence[_Plan]) -> None:
    layout = pool.layout
    with torch.no_grad():
        for plan in plans:
            index = layout.token_index(plan.blocks, plan.slots)
            pool.key(plan.layer)[index] = plan.key
            pool.value(plan.layer)[index] = plan.value


# --- public --------------------------------------------------------------------------------


def write_layer(pool: BlockPool, layer: int, key: torch.Tensor, value: torch.Tensor,
                block_ids: BlockTable, *, start: int = 0,
                heads: tuple[int, int] | None = None) -> None:
    """Write one layer's K/V (``[batch, kv_heads, seq, head_dim]`` or ``[seq, kv_heads,
    head_dim]``, the pool's dtype and device) into the blocks of ``block_ids`` at token
    positions ``[start, start + seq)``. ``block_ids`` is one block table (one sequence) or
    one per batch row, covering at least ``start + seq`` tokens; only the blocks of those
    positions are written. ``heads``: see the module docstring. Errors
    (``kvhandoff.kvcache.errors``) are raised before anything is written."""
    _apply(_check_pool(pool), [_plan(pool, layer, key, value, block_ids, start, heads)])


def write_cache(pool: BlockPool, kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
                block_ids: BlockTable, *, start: int = 0,
                heads: tuple[int, int] | None = None) -> None:
    """``write_layer`` for every layer at once: ``kv[i]`` is layer ``i``'s ``(key, value)``,
    one per pool layer. Every layer is checked before any is written."""
    _check_pool(pool)
    if isinstance(kv, torch.Tensor) or not isinstance(kv, Sequence) or \
            len(kv) != pool.num_layers:
        got = len(kv) if isinstance(kv, Sequence) else type(kv).__name__
        raise KVShapeError("kv", f"one (key, value) per layer ({pool.num_layers})", got)
    plans = []
    for layer, pair in enumerate(kv):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise KVShapeError(f"kv[{layer}]", "a (key, value) pair", type(pair).__name__)
        plans.append(_plan(pool, layer, pair[0], pair[1], block_ids, start, heads))
    _apply(pool, plans)


def read_layer(pool: BlockPool, layer: int, block_ids: BlockTable, num_tokens: int, *,
               start: int = 0, form: Form = "bhsd") -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s K and V of token positions ``[start, start + num_tokens)``, as new
    tensors ``[batch, kv_heads, num_tokens, head_dim]`` (``form="bhsd"``, one batch row per
    block table) or ``[num_tokens, kv_heads, head_dim]`` (``"shd"``, one table)."""
    _check_layer(_check_pool(pool), layer)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise KVShapeError("num_tokens", "an int >= 0", num_tokens)
    if form not in ("bhsd", "shd"):
        raise KVShapeError("form", "'bhsd' or 'shd'", form)
    batch = len(_tables(block_ids))
    if form == "shd" and batch != 1:
        raise BlockTableError(f"form='shd' reads one sequence, got {batch} block tables")
    blocks, slots = _positions(pool, block_ids, batch, start, num_tokens, unique=False)
    index = pool.layout.token_index(blocks, slots)
    out = []
    for tensor in (pool.key(layer), pool.value(layer)):
        rows = tensor[index]  # [batch * tokens, kv_heads, head_dim], a copy
        rows = rows.view(batch, num_tokens, pool.layout.kv_heads, pool.layout.head_dim)
        out.append(rows[0].contiguous() if form == "shd" else rows.transpose(1, 2).contiguous())
    return out[0], out[1]


def read_cache(pool: BlockPool, block_ids: BlockTable, num_tokens: int, *, start: int = 0,
               form: Form = "bhsd") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``read_layer`` of every layer: ``[(key, value), ...]`` in layer order."""
    return [read_layer(pool, layer, block_ids, num_tokens, start=start, form=form)
            for layer in range(_check_pool(pool).num_layers)]
