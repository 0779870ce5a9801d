"""kvhandoff.kvcache: a model's per-layer K/V into a pool's blocks at a token offset and back,
for both block orders, batch rows, TP head slices; the typed refusals (never a cast), each
raised before any block is written."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from kvhandoff.engine import BlockPool, KVLayout
from kvhandoff.kvcache import (
    BlockTableError,
    KVDeviceError,
    KVDtypeError,
    KVShapeError,
    blocks_for_tokens,
    read_cache,
    read_layer,
    write_cache,
    write_layer,
)

BT, H, D, L = 4, 2, 8, 2


def pool_for(order: str, num_blocks: int = 12, kv_heads: int = H, dtype: torch.dtype =
             torch.float32, **kw: object) -> BlockPool:
    return BlockPool.from_layout(KVLayout(L, BT, kv_heads, D, dtype, order, **kw), num_blocks)


def model_kv(batch: int, seq: int, heads: int = H, seed: int = 0,
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, seq, D, generator=gen).to(dtype),
            torch.randn(batch, heads, seq, D, generator=gen).to(dtype))


def token_at(pool: BlockPool, tensor: torch.Tensor, table: list[int], position: int,
             head: int) -> torch.Tensor:
    """The pool's element for one (token, head), found by hand from the order's definition
    (NHD: block[t, h]; HND: block[h, t]), independently of ``KVLayout.token_index``."""
    block, slot = table[position // BT], position % BT
    if pool.layout.order == "NHD":
        return tensor[block, slot, head]
    return tensor[block, head, slot]


ORDERS = ["NHD", "HND"]


def test_blocks_for_tokens() -> None:
    pool = pool_for("NHD")
    assert [blocks_for_tokens(n, 16) for n in (0, 1, 16, 17, 33)] == [0, 1, 1, 2, 3]
    assert blocks_for_tokens(9, pool) == blocks_for_tokens(9, pool.layout) == 3
    for bad in ((-1, 16), (3, 0), (True, 4), (2.0, 4)):
        with pytest.raises(KVShapeError):
            blocks_for_tokens(*bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("order", ORDERS)
def test_write_layer_puts_each_token_where_the_order_says(order: str) -> None:
    pool = pool_for(order)
    key, value = model_kv(1, 10)
    table = [7, 2, 9]
    write_layer(pool, 1, key, value, table, start=1)  # positions 1..10, mid-block start
    for position in range(1, 11):
        for head in range(H):
            assert torch.equal(token_at(pool, pool.key(1), table, position, head),
                               key[0, head, position - 1])
            assert torch.equal(token_at(pool, pool.value(1), table, position, head),
                               value[0, head, position - 1])
    # Untouched: slot 0 of the first block, the slot after the last token, layer 0.
    assert not token_at(pool, pool.key(1), table, 0, 0).any()
    assert not token_at(pool, pool.key(1), table, 11, 0).any()
    assert not pool.key(0).any()


@pytest.mark.parametrize("order", ORDERS)
def test_write_then_read_round_trip_with_offsets_and_appends(order: str) -> None:
    pool = pool_for(order)
    key, value = model_kv(1, 11, seed=1)
    table = [3, 0, 5]
    write_layer(pool, 0, key[:, :, :6], value[:, :, :6], table)  # a prefill of 6 tokens
    write_layer(pool, 0, key[:, :, 6:], value[:, :, 6:], table, start=6)  # then 5 more
    k, v = read_layer(pool, 0, table, 11)
    assert torch.equal(k, key) and torch.equal(v, value)
    k_mid, _ = read_layer(pool, 0, table, 4, start=5)
    assert torch.equal(k_mid, key[:, :, 5:9])
    k_shd, v_shd = read_layer(pool, 0, table, 11, form="shd")
    assert torch.equal(k_shd, key[0].transpose(0, 1)) and torch.equal(v_shd,
                                                                       value[0].transpose(0, 1))


@pytest.mark.parametrize("order", ORDERS)
def test_token_major_input_and_batch_rows(order: str) -> None:
    pool = pool_for(order)
    key, value = model_kv(2, 7, seed=2)
    tables = [[1, 4], [8, 6]]
    write_cache(pool, [(key, value), (value, key)], tables)
    kv = read_cache(pool, tables, 7)
    assert torch.equal(kv[0][0], key) and torch.equal(kv[1][0], value)
    assert torch.equal(kv[0][1], value) and torch.equal(kv[1][1], key)
    # [seq, heads, dim] for one sequence, into other blocks.
    write_layer(pool, 0, key[1].transpose(0, 1), value[1].transpose(0, 1), torch.tensor([0, 2]))
    k, _ = read_layer(pool, 0, [0, 2], 7)
    assert torch.equal(k[0], key[1])
    k, _ = read_layer(pool, 0, np.array(tables), 7)  # numpy tables, one row per sequence
    assert torch.equal(k, key)
    with pytest.raises(BlockTableError):
        read_layer(pool, 0, np.array([0.0, 2.0]), 7)


@pytest.mark.parametrize("order", ORDERS)
def test_tp_head_slices_reassemble_the_model_cache(order: str) -> None:
    """Two TP ranks each hold one of two KV heads (kv_heads=1 per pool): each writes its
    slice of the full cache; reading both and concatenating the heads gives the cache."""
    key, value = model_kv(1, 9, heads=2, seed=3)
    table = [4, 1, 7]
    shards = [pool_for(order, kv_heads=1, tp_rank=r, tp_size=2) for r in range(2)]
    write_layer(shards[0], 0, key, value, table)  # heads [0, 1): the layout's own shard
    write_layer(shards[1], 0, key, value, table, heads=(1, 2))  # explicit slice
    parts = [read_layer(shard, 0, table, 9) for shard in shards]
    assert torch.equal(torch.cat([p[0] for p in parts], dim=1), key)
    assert torch.equal(torch.cat([p[1] for p in parts], dim=1), value)
    assert torch.equal(parts[1][0][:, 0], key[:, 1])
    with pytest.raises(KVShapeError) as info:
        write_layer(shards[1], 0, key, value, table, heads=(0, 2))  # two heads, pool has one
    assert info.value.name == "heads"
    with pytest.raises(KVShapeError):
        write_layer(pool_for(order, kv_heads=1), 0, key, value, table)  # no tp: ambiguous


def test_dtype_is_never_cast_the_float16_default_trap() -> None:
    """A bf16 model's K/V into a pool built without dtype= (float16) is refused, not cast."""
    pool = BlockPool(8, L, BT, H, D)  # the compatible default: float16
    assert pool.dtype == torch.float16
    key, value = model_kv(1, 5, dtype=torch.bfloat16)
    with pytest.raises(KVDtypeError) as info:
        write_layer(pool, 0, key, value, [0, 1])
    assert info.value.expected == torch.float16 and info.value.got == torch.bfloat16
    assert not pool.key(0).any()
    right = BlockPool.from_layout(KVLayout(L, BT, H, D, torch.bfloat16), 8)
    write_layer(right, 0, key, value, [0, 1])
    assert torch.equal(read_layer(right, 0, [0, 1], 5)[0], key)


def test_refusals_are_typed_and_write_nothing() -> None:
    pool = pool_for("HND")
    key, value = model_kv(1, 6, seed=4)
    before = [layer.clone() for layer in pool.layers]
    cases: list[tuple[type[Exception], dict[str, object]]] = [
        (BlockTableError, dict(block_ids=[0])),  # 6 tokens need 2 blocks
        (BlockTableError, dict(block_ids=[0, 99])),  # outside the pool
        (BlockTableError, dict(block_ids=[3, 3])),  # one block for two places
        (BlockTableError, dict(block_ids=[[0, 1], [2, 3]])),  # two tables, one batch row
        (BlockTableError, dict(block_ids=[0.0, 1.0])),
        (BlockTableError, dict(block_ids="01")),
        (KVShapeError, dict(start=-1)),
        (KVShapeError, dict(layer=2)),
        (KVShapeError, dict(value=value[:, :, :5])),
        (KVShapeError, dict(key=key[0, 0])),
        (KVShapeError, dict(key=torch.zeros(1, H, 6, D + 1), value=torch.zeros(1, H, 6, D + 1))),
        (KVDtypeError, dict(value=value.double())),
        (KVDeviceError, dict(key=key.to("meta"))),
    ]
    for error, override in cases:
        args: dict[str, object] = dict(layer=1, key=key, value=value, block_ids=[0, 1],
                                       start=0)
        args.update(override)
        with pytest.raises(error):
            write_layer(pool, args["layer"], args["key"], args["value"],  # type: ignore[arg-type]
                        args["block_ids"], start=args["start"])  # type: ignore[arg-type]
    # write_cache checks every layer before writing any: a bad layer 1 keeps layer 0 clean.
    with pytest.raises(KVDtypeError):
        write_cache(pool, [(key, value), (key.half(), value.half())], [0, 1])
    with pytest.raises(KVShapeError):
        write_cache(pool, [(key, value)], [0, 1])
    assert all(torch.equal(a, b) for a, b in zip(pool.layers, before, strict=True))
    with pytest.raises(BlockTableError):
        read_layer(pool, 0, [[0, 1], [2, 3]], 4, form="shd")
    with pytest.raises(BlockTableError):
        read_layer(pool, 0, [0], 5)


def test_adopted_vllm_tensor_sees_the_tokens() -> None:
    """Through an adopted vLLM-layout tensor: token t of head h of layer l's K sits at
    ``kv[l][0, block, t % block_tokens, h]`` (NHD)."""
    host = [torch.zeros(2, 6, BT, H, D) for _ in range(L)]
    pool = BlockPool.from_tensors(host)
    key, value = model_kv(1, 5, seed=5)
    write_layer(pool, 1, key, value, [4, 2])
    assert torch.equal(host[1][0, 4, 3, 1], key[0, 1, 3])
    assert torch.equal(host[1][1, 2, 0, 0], value[0, 0, 4])
    assert not host[0].any()


def test_hf_read_without_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvhandoff.kvcache import MissingExtraError, read_dynamic_cache

    monkeypatch.setitem(sys.modules, "transformers", None)  # import now raises ImportError
    with pytest.raises(MissingExtraError) as info:
        read_dynamic_cache(pool_for("NHD"), [0], 1)
    assert info.value.extra == "hf" and "kvhandoff[hf]" in str(info.value)
