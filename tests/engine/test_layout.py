"""KVLayout: validation, the canonical description, diff naming every field with both values,
the fingerprint (unchanged for existing pools), and the bounded binary form."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kvhandoff.engine import (
    MAX_LAYOUT_BYTES,
    BlockPool,
    KVLayout,
    LayoutDecodeError,
    LayoutDifference,
    LayoutError,
    LayoutMismatchError,
)
from kvhandoff.engine import _wire as wire
from kvhandoff.engine.layout import MAX_EXTRA_ITEMS

BASE = KVLayout(num_layers=4, block_tokens=16, kv_heads=8, head_dim=128, dtype=torch.bfloat16)


def test_layout_block_shape_follows_the_order() -> None:
    assert BASE.block_shape == (16, 8, 128)
    hnd = KVLayout(4, 16, 8, 128, torch.bfloat16, "HND")
    assert hnd.block_shape == (8, 16, 128)
    assert BASE.block_nbytes == hnd.block_nbytes == 2 * 4 * 16 * 8 * 128 * 2
    assert BASE.blocks_for(0) == 0 and BASE.blocks_for(16) == 1 and BASE.blocks_for(17) == 2


@pytest.mark.parametrize(("field", "value"), [
    ("num_layers", 0), ("num_layers", True), ("block_tokens", -1), ("kv_heads", 1.0),
    ("head_dim", 2**25), ("dtype", "float16"), ("order", "HDN"), ("tp_size", 0),
    ("tp_rank", 2), ("extra", (1.5,)), ("extra", "ab"), ("extra", ("x" * 65,)),
    ("extra", tuple(range(MAX_EXTRA_ITEMS + 1))), ("extra", (2**63,)),
])
def test_layout_invalid_field_is_typed_and_named(field: str, value: object) -> None:
    fields = BASE.describe() | {"dtype": torch.bfloat16, "tp_size": 2}
    fields[field] = value
    with pytest.raises(LayoutError) as info:
        KVLayout(**fields)
    assert info.value.name == field and info.value.value == value


def test_layout_describe_is_canonical_and_ordered() -> None:
    layout = KVLayout(2, 16, 4, 64, torch.float16, "HND", 1, 2, ("int8-kv", 3))
    assert layout.describe() == {
        "num_layers": 2, "block_tokens": 16, "kv_heads": 4, "head_dim": 64,
        "dtype": "float16", "order": "HND", "tp_rank": 1, "tp_size": 2,
        "extra": ("int8-kv", 3),
    }
    assert list(layout.describe()) == [f.name for f in KVLayout.__attrs_attrs__]


def test_layout_diff_names_every_field_with_both_values() -> None:
    other = KVLayout(5, 32, 4, 64, torch.float16, "HND", 1, 2, ("q",))
    differences = BASE.diff(other)
    assert differences == (
        LayoutDifference("num_layers", 4, 5), LayoutDifference("block_tokens", 16, 32),
        LayoutDifference("kv_heads", 8, 4), LayoutDifference("head_dim", 128, 64),
        LayoutDifference("dtype", "bfloat16", "float16"), LayoutDifference("order", "NHD", "HND"),
        LayoutDifference("tp_rank", 0, 1), LayoutDifference("tp_size", 1, 2),
        LayoutDifference("extra", (), ("q",)),
    )
    assert BASE.diff(BASE) == () and BASE.diff(KVLayout(**BASE.describe()
                                                        | {"dtype": torch.bfloat16})) == ()
    # Each side sees its own value as "here".
    assert other.diff(BASE)[0] == LayoutDifference("num_layers", 5, 4)


def test_layout_check_matches_raises_with_the_fields_on_both_sides() -> None:
    peer = KVLayout(4, 16, 4, 128, torch.float16)
    with pytest.raises(LayoutMismatchError) as here:
        BASE.check_matches(peer)
    with pytest.raises(LayoutMismatchError) as there:
        peer.check_matches(BASE)
    assert here.value.fields == there.value.fields == ("kv_heads", "dtype")
    assert here.value.differences == (("kv_heads", 8, 4), ("dtype", "bfloat16", "float16"))
    assert there.value.differences == (("kv_heads", 4, 8), ("dtype", "float16", "bfloat16"))
    text = str(here.value)
    assert "kv_heads: here 8, peer 4" in text and "dtype: here 'bfloat16', peer 'float16'" in text
    BASE.check_matches(KVLayout(4, 16, 8, 128, torch.bfloat16))  # equal: no error


def test_layout_fingerprint_of_existing_pools_unchanged() -> None:
    # The value the engine computed for BlockPool(n, 2, 4, 2, 8) before layouts existed.
    pool = BlockPool(8, 2, 4, 2, 8)
    assert pool.layout.fingerprint() == 827550620243509191
    for args in [(3, 16, 8, 128, torch.bfloat16), (1, 1, 1, 1, torch.int8)]:
        pool = BlockPool(4, *args[:4], dtype=args[4])
        assert pool.layout.fingerprint() == wire.layout_fingerprint(
            pool.num_layers, pool.block_shape, pool.dtype)
        # The engine's layout_extra convention for a TP shard is the layout's tp fields.
        sharded = KVLayout(*args, tp_rank=1, tp_size=2)
        assert sharded.fingerprint() == wire.layout_fingerprint(
            pool.num_layers, pool.block_shape, pool.dtype, extra=(1, 2))
        assert sharded.fingerprint(extra=("x",)) == wire.layout_fingerprint(
            pool.num_layers, pool.block_shape, pool.dtype, extra=(1, 2, "x"))


def test_layout_fingerprint_tells_the_orders_apart_when_shapes_coincide() -> None:
    nhd = KVLayout(2, 8, 8, 64, torch.float16, "NHD")
    hnd = KVLayout(2, 8, 8, 64, torch.float16, "HND")
    assert nhd.block_shape == hnd.block_shape
    assert nhd.fingerprint() != hnd.fingerprint()
    fingerprints = {KVLayout(**BASE.describe() | {"dtype": torch.bfloat16, field: value})
                    .fingerprint() for field, value in [
                        ("num_layers", 3), ("block_tokens", 8), ("kv_heads", 4),
                        ("head_dim", 64), ("dtype", torch.float16), ("order", "HND"),
                        ("extra", ("a",))]}
    assert len(fingerprints) == 7 and BASE.fingerprint() not in fingerprints


layouts = st.builds(
    KVLayout,
    num_layers=st.integers(1, 2**16), block_tokens=st.integers(1, 2**24),
    kv_heads=st.integers(1, 2**24), head_dim=st.integers(1, 2**24),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.int8,
                           torch.uint8, torch.float8_e4m3fn]),
    order=st.sampled_from(["NHD", "HND"]),
    tp_size=st.just(1),
    extra=st.lists(st.one_of(st.integers(-(2**63), 2**63 - 1),
                             st.text(max_size=16)), max_size=MAX_EXTRA_ITEMS).map(tuple),
)


@given(layouts)
def test_layout_encode_decode_round_trip(layout: KVLayout) -> None:
    data = layout.encode()
    assert len(data) <= MAX_LAYOUT_BYTES
    assert KVLayout.decode(data) == layout
    # Every strict prefix is refused, and so is any trailing byte.
    for cut in range(len(data)):
        with pytest.raises(LayoutDecodeError):
            KVLayout.decode(data[:cut])
    with pytest.raises(LayoutDecodeError):
        KVLayout.decode(data + b"\0")


def test_layout_largest_encoding_fits_the_bound() -> None:
    layout = KVLayout(2**16, 2**24, 2**24, 2**24, torch.float8_e4m3fnuz, "HND", 2**16 - 1,
                      2**16, tuple("\u00e9" * 32 for _ in range(MAX_EXTRA_ITEMS)))
    assert len(layout.encode()) <= MAX_LAYOUT_BYTES <= 600
    assert KVLayout.decode(layout.encode()) == layout


def _patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize(("offset", "fmt", "value", "problem"), [
    (0, "!B", ord("X"), "magic"),
    (3, "!B", 2, "version"),
    (4, "!I", 0, "num_layers"),
    (8, "!I", 2**24 + 1, "block_tokens"),
    (20, "!B", 7, "order code"),
    (21, "!I", 5, "tp_rank"),
])
def test_layout_decode_refuses_bad_fields(offset: int, fmt: str, value: int,
                                          problem: str) -> None:
    data = KVLayout(2, 16, 4, 64, torch.float16, "HND", 1, 4).encode()
    with pytest.raises(LayoutDecodeError) as info:
        KVLayout.decode(_patched(data, offset, fmt, value))
    assert problem in info.value.problem


def test_layout_decode_refuses_unknown_dtype_tags_and_non_bytes() -> None:
    data = KVLayout(2, 16, 4, 64, torch.float16, extra=(1,)).encode()
    name_at = data.index(b"float16")
    for bad in (data[:name_at] + b"Tensor1" + data[name_at + 7:],  # a torch name, no dtype
                data[:name_at] + b"__doc__" + data[name_at + 7:]):
        with pytest.raises(LayoutDecodeError, match="unknown dtype"):
            KVLayout.decode(bad)
    tag_at = name_at + 7
    with pytest.raises(LayoutDecodeError, match="tag"):
        KVLayout.decode(data[:tag_at] + b"\x09" + data[tag_at + 1:])
    with pytest.raises(LayoutDecodeError, match="more than"):
        KVLayout.decode(b"\0" * (MAX_LAYOUT_BYTES + 1))
    with pytest.raises(LayoutDecodeError, match="expected bytes"):
        KVLayout.decode("KVL")  # type: ignore[arg-type]
