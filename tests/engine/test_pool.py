"""BlockPool: layout, alloc/free, pins that defer frees, typed errors, check, debug poison."""

from __future__ import annotations

import copy
import subprocess
import sys
import types
from typing import Any

import kvhandoff.engine as engine_pkg
import pytest
import torch
from kvhandoff.engine import (
    BlockPool,
    DoubleFreeError,
    KVLayout,
    NotOwnerError,
    OutOfBlocksError,
    PinError,
    PoisonError,
    PoolConfigError,
    PoolError,
    PoolInvariantError,
    UnknownBlockError,
)


class RecordingLogger:
    """Collects structlog-style ``info`` calls."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))


def make(num_blocks: int = 8, **kw: Any) -> BlockPool:
    args: dict[str, Any] = {"num_layers": 2, "block_tokens": 4, "kv_heads": 2, "head_dim": 8}
    args.update(kw)
    return BlockPool(num_blocks, **args)


def books(pool: BlockPool) -> tuple[Any, ...]:
    """Everything observable about the pool's bookkeeping."""
    return (
        list(pool._free), bytes(pool._is_free), dict(pool._holder), dict(pool._deferred),
        copy.deepcopy(pool._pins), copy.deepcopy(pool._pinned_by), dict(pool._shared_pins),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int8,
                                   torch.uint8])
def test_pool_layers_are_k_v_per_layer_with_block_shape(dtype: torch.dtype) -> None:
    pool = make(num_blocks=5, num_layers=3, dtype=dtype)
    assert len(pool.layers) == 6
    for tensor in pool.layers:
        assert tensor.shape == (5, 4, 2, 8) and tensor.dtype == dtype
        assert tensor.device.type == "cpu" and tensor.is_contiguous()
    assert pool.key(1) is pool.layers[2] and pool.value(1) is pool.layers[3]
    assert pool.block_nbytes == 6 * 4 * 2 * 8 * torch.tensor([], dtype=dtype).element_size()
    assert len({t.data_ptr() for t in pool.layers}) == 6


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_blocks", 0), ("num_layers", -1), ("head_dim", 2.0), ("dtype", "float16"),
     ("device", "warp-drive")],
)
def test_pool_rejects_bad_config(field: str, value: Any) -> None:
    args: dict[str, Any] = {"num_blocks": 4, "num_layers": 1, "block_tokens": 2, "kv_heads": 1,
                            "head_dim": 4}
    args[field] = value
    with pytest.raises(PoolConfigError) as info:
        BlockPool(**args)
    assert info.value.name == field


def test_pool_holds_its_layout_the_float16_default_kept() -> None:
    pool = make(num_blocks=3)
    assert pool.layout == KVLayout(2, 4, 2, 8, torch.float16)  # default dtype, NHD
    assert pool.block_shape == pool.layout.block_shape == (4, 2, 8)
    assert pool.block_nbytes == pool.layout.block_nbytes


@pytest.mark.parametrize("order", ["NHD", "HND"])
def test_pool_from_layout_allocates_for_either_order(order: str) -> None:
    layout = KVLayout(3, 4, 2, 8, torch.bfloat16, order)  # type: ignore[arg-type]
    pool = BlockPool.from_layout(layout, 5, debug=True)
    assert pool.layout is layout and pool.dtype == torch.bfloat16
    expected = (4, 2, 8) if order == "NHD" else (2, 4, 8)
    assert pool.block_shape == expected
    assert all(t.shape == (5, *expected) and t.is_contiguous() for t in pool.layers)
    ids = pool.alloc(2, owner="r")
    pool.free(ids, owner="r")
    pool.assert_poisoned()
    with pytest.raises(PoolConfigError):
        BlockPool.from_layout("NHD", 4)  # type: ignore[arg-type]
    with pytest.raises(PoolConfigError):
        BlockPool.from_layout(layout, 0)


def test_pool_alloc_free_roundtrip_and_counts() -> None:
    pool = make()
    a = pool.alloc(3, owner="r1")
    b = pool.alloc(2)
    assert len(set(a) | set(b)) == 5
    assert (pool.num_free, pool.num_allocated, pool.num_deferred) == (3, 5, 0)
    assert pool.holder(a[0]) == "r1" and pool.holder(b[0]) is None
    assert pool.free(a, owner="r1") == a
    assert pool.free(b) == b
    assert pool.num_free == 8 and pool.alloc(0) == []
    pool.check()


def test_pool_alloc_hands_out_longest_free_first() -> None:
    pool = make(num_blocks=4)
    first = pool.alloc(2)
    pool.free(first)
    assert pool.alloc(2) == [2, 3]  # the just-freed blocks rest at the back


def test_pool_out_of_blocks_is_typed_and_changes_nothing() -> None:
    pool = make(num_blocks=4)
    pool.alloc(3)
    before = books(pool)
    with pytest.raises(OutOfBlocksError) as info:
        pool.alloc(2)
    assert (info.value.requested, info.value.available) == (2, 1)
    assert books(pool) == before


def test_pool_free_errors_are_typed_and_change_nothing() -> None:
    pool = make()
    mine = pool.alloc(2, owner="r1")
    theirs = pool.alloc(1, owner="r2")
    pool.free([mine[1]], owner="r1")
    before = books(pool)
    with pytest.raises(DoubleFreeError) as double:
        pool.free([mine[0], mine[1]], owner="r1")  # mine[1] is free already
    assert double.value.block_ids == (mine[1],)
    with pytest.raises(DoubleFreeError):
        pool.free([mine[0], mine[0]], owner="r1")  # listed twice
    with pytest.raises(UnknownBlockError) as unknown:
        pool.free([mine[0], 99, -1], owner="r1")
    assert unknown.value.block_ids == (99, -1) and unknown.value.num_blocks == 8
    with pytest.raises(UnknownBlockError):
        pool.free(["3"], owner="r1")  # type: ignore[list-item]
    with pytest.raises(NotOwnerError) as not_owner:
        pool.free([mine[0], theirs[0]], owner="r1")
    assert not_owner.value.block_ids == (theirs[0],)
    assert not_owner.value.holders == {theirs[0]: "r2"} and not_owner.value.owner == "r1"
    assert books(pool) == before
    assert all(isinstance(e.value, PoolError) for e in (double, unknown, not_owner))


def test_pool_free_of_pinned_block_is_deferred_until_last_unpin() -> None:
    log = RecordingLogger()
    pool = make(logger=log)
    ids = pool.alloc(3, owner="host")
    pool.pin(ids[:2], "xfer-a")
    pool.pin(ids[1:2], "xfer-b")
    assert pool.free(ids, owner="host") == [ids[2]]  # the unpinned one goes back now
    assert pool.num_deferred == 2 and not pool.is_free(ids[0]) and not pool.is_free(ids[1])
    pool.check()
    assert pool.unpin(ids[:2], "xfer-a") == [ids[0]]  # ids[1] is still pinned by xfer-b
    assert not pool.is_free(ids[1])
    assert pool.unpin_all("xfer-b") == [ids[1]]
    assert pool.num_free == 8 and pool.num_pinned == 0 and pool.num_deferred == 0
    pool.check()
    assert log.events == [
        ("pool.deferred_free", {"block_ids": [ids[0], ids[1]], "owner": "xfer-a",
                                "phase": "deferred"}),
        ("pool.deferred_free", {"block_ids": [ids[1]], "owner": "xfer-b", "phase": "deferred"}),
        ("pool.deferred_free", {"block_ids": [ids[0]], "owner": "xfer-a", "phase": "released"}),
        ("pool.deferred_free", {"block_ids": [ids[1]], "owner": "xfer-b", "phase": "released"}),
    ]


def test_pool_unpin_before_free_keeps_block_allocated() -> None:
    pool = make()
    ids = pool.alloc(2, owner="host")
    pool.pin(ids, "xfer")
    assert pool.unpin(ids, "xfer") == []
    assert pool.num_allocated == 2 and pool.pins(ids[0]) == frozenset()
    assert pool.free(ids, owner="host") == ids


def test_pool_pin_errors_are_typed_and_change_nothing() -> None:
    pool = make()
    ids = pool.alloc(2, owner="host")
    pool.pin(ids[:1], "xfer")
    free_block = next(b for b in range(8) if pool.is_free(b))
    before = books(pool)
    cases = [
        (lambda: pool.pin([free_block], "x2"), (free_block,)),
        (lambda: pool.pin(ids, "xfer"), (ids[0],)),  # already pinned by xfer
        (lambda: pool.pin([ids[1], ids[1]], "x2"), (ids[1], ids[1])),
        (lambda: pool.unpin(ids, "xfer"), (ids[1],)),  # xfer does not pin ids[1]
        (lambda: pool.unpin(ids[:1], "other"), (ids[0],)),
    ]
    for call, blocks in cases:
        with pytest.raises(PinError) as info:
            call()
        assert info.value.block_ids == blocks
        assert books(pool) == before
    with pytest.raises(PinError):
        pool.pin(ids[1:], "")  # an owner is a request id
    pool.free(ids, owner="host")  # ids[0] deferred
    with pytest.raises(PinError) as freed:
        pool.pin(ids[:1], "late")
    assert "freed" in freed.value.problem


def test_pool_pin_many_and_unpin_many_are_all_or_none() -> None:
    pool = make(debug=True)
    a, b, c = (pool.alloc(2, owner=o) for o in ("a", "b", "c"))
    pool.pin(c[:1], "busy")
    before = books(pool)
    free_block = next(x for x in range(8) if pool.is_free(x))
    for bad in ([(a, "ta"), ([free_block], "tb")],  # the second is free
                [(a, "ta"), (b, "ta")],  # one owner twice in a batch
                [(a, "ta"), (c[:1], "busy")]):  # already pinned by that owner
        with pytest.raises(PinError):
            pool.pin_many(bad)
        assert books(pool) == before  # the good first pin was not made either
    pool.pin_many([(a, "ta"), (b, "tb"), (c, "tc")])  # c[0] now pinned twice
    for ids, owner in ((a, "a"), (b, "b"), (c, "c")):
        pool.free(ids, owner=owner)  # all deferred while pinned
    assert pool.num_deferred == 6
    pinned = books(pool)
    with pytest.raises(PinError):
        pool.unpin_many([(a, "ta"), (b, "nobody")])
    assert books(pool) == pinned
    released = pool.unpin_many([(a, "ta"), (b, "tb"), (c, "tc")])
    assert sorted(released) == sorted(a + b + c[1:])  # c[0]: "busy" still pins it
    pool.assert_poisoned(released)
    assert pool.unpin_many([(c[:1], "busy")]) == c[:1]
    pool.check()


def test_pool_check_detects_broken_books() -> None:
    pool = make()
    ids = pool.alloc(2)
    pool.check()
    pool._free.append(ids[0])  # a block both allocated and free
    with pytest.raises(PoolInvariantError) as info:
        pool.check()
    assert ids[0] in info.value.block_ids and info.value.problems


def test_pool_debug_poisons_freed_blocks_and_catches_late_write() -> None:
    pool = make(debug=True)
    pool.assert_poisoned()  # a fresh pool is all free, all poisoned
    ids = pool.alloc(2, owner="r")
    for tensor in pool.layers:
        tensor[ids] = 1.0
    pool.free(ids, owner="r")
    for tensor in pool.layers:
        assert torch.isnan(tensor[ids]).all()  # a late read sees NaN
    pool.assert_poisoned(ids)
    pool.layers[3][ids[1], 0, 0, 0] = 0.5  # a late write through a stale id
    with pytest.raises(PoisonError) as info:
        pool.assert_poisoned()
    assert info.value.block_ids == (ids[1],)
    before = books(pool)
    with pytest.raises(PoisonError):  # and the block is never handed out again
        pool.alloc(8)
    assert books(pool) == before


def test_pool_debug_poison_for_integer_dtype_uses_byte_pattern() -> None:
    pool = make(debug=True, dtype=torch.int8)
    ids = pool.alloc(1)
    pool.layers[0][ids] = 3
    pool.free(ids)
    assert (pool.layers[0][ids].view(torch.uint8) == 0xA5).all()
    pool.layers[0][ids[0], 1, 1, 1] = 0
    with pytest.raises(PoisonError):
        pool.assert_poisoned(ids)


def test_pool_assert_poisoned_requires_debug_and_free_blocks() -> None:
    with pytest.raises(PoolConfigError):
        make().assert_poisoned()
    pool = make(debug=True)
    ids = pool.alloc(1)
    with pytest.raises(PoolError):
        pool.assert_poisoned(ids)


def test_pool_accepts_numpy_style_integer_ids() -> None:
    pool = make()
    ids = pool.alloc(2)
    assert pool.free(torch.tensor(ids)) == ids  # 0-d integer tensors index like ints


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_pool_on_cuda_device() -> None:
    pool = make(device="cuda", debug=True)
    assert all(t.is_cuda for t in pool.layers)
    ids = pool.alloc(3, owner="r")
    pool.pin(ids, "x")
    pool.free(ids, owner="r")
    pool.unpin(ids, "x")
    pool.assert_poisoned()
    pool.check()


def test_engine_all_matches_public_names() -> None:
    public = {
        name for name in dir(engine_pkg)
        if not name.startswith("_")
        and not isinstance(getattr(engine_pkg, name), types.ModuleType)
    }
    public -= {"annotations", "importlib", "TYPE_CHECKING", "Any"}
    assert set(engine_pkg.__all__) >= {
        "BlockPool", "PoolError", "DoubleFreeError", "UnknownBlockError", "NotOwnerError",
        "OutOfBlocksError", "PinError", "PoisonError", "PoolInvariantError", "PoolConfigError",
    }
    assert set(engine_pkg.__all__) == public
    assert engine_pkg.BlockPool is BlockPool
    with pytest.raises(AttributeError):
        engine_pkg.NoSuchThing  # noqa: B018


def test_engine_import_does_not_import_torch() -> None:
    code = "import sys, kvhandoff.engine; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
