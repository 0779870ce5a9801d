"""``KVLayout``: the one description of what a pool's bytes mean.

A pool's memory is ``2 * num_layers`` tensors ``[num_blocks, *block_shape]`` (K and V of each
layer, ``pool.layers``). What a block of one of them holds is the layout: ``block_tokens``
tokens of ``kv_heads`` heads of ``head_dim`` elements of ``dtype``, in one of two orders:

* ``NHD`` (kvhandoff's own and vLLM's default): a block is ``[block_tokens, kv_heads,
  head_dim]``, token ``t`` of head ``h`` at ``block[t, h]``;
* ``HND`` (vLLM's head-major variant): a block is ``[kv_heads, block_tokens, head_dim]``,
  token ``t`` of head ``h`` at ``block[h, t]``.

``tp_rank``/``tp_size`` say which shard of the model's KV heads the pool holds, and ``extra``
carries anything else of the host's that changes the bytes' meaning (a quantisation scheme,
a model revision). Two ranks may exchange blocks only when their layouts are equal.

Three views of one layout, all derived here so they cannot drift apart:

* ``describe()``: the canonical field -> value mapping (what a human or a log reads), and
  ``diff(other)``, which names every differing field with both values;
* ``fingerprint()``: the u64 of ``kvhandoff.engine._wire.layout_fingerprint``. For an ``NHD``
  layout with one TP shard and no extras it is exactly the value the engine has always
  computed from ``(num_layers, block_shape, dtype)``; a TP shard adds ``(tp_rank, tp_size)``
  to the extras (what ``TransferEngine(layout_extra=(tp_rank, tp_size))`` passes today), and
  ``HND`` adds ``"order=HND"`` (so an ``HND`` pool whose ``block_tokens == kv_heads`` does not
  collide with the ``NHD`` one);
* ``encode()`` / ``KVLayout.decode(data)``: a compact, bounded binary form (at most
  ``MAX_LAYOUT_BYTES``) to carry in a control message. Decoding validates every field and
  raises ``LayoutDecodeError``; nothing is ever unpickled or evaluated.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any, Literal

import attrs
import torch
from kvhandoff.engine import _wire as wire
from kvhandoff.engine.errors import LayoutDecodeError, LayoutError, LayoutMismatchError

__all__ = ["MAX_LAYOUT_BYTES", "KVLayout", "LayoutDifference"]

Order = Literal["NHD", "HND"]
_ORDERS: tuple[Order, ...] = ("NHD", "HND")

#: Upper bounds of the fields (the encoded form's limits; far above any model).
MAX_LAYERS = wire.MAX_CHUNKS
MAX_DIM = 2**24
MAX_TP_SIZE = 2**16
MAX_EXTRA_ITEMS = 8
MAX_EXTRA_TEXT_BYTES = 64
MAX_DTYPE_NAME_BYTES = 32

_MAGIC = b"KVL"
_VERSION = 1
# magic, version, num_layers, block_tokens, kv_heads, head_dim, order, tp_rank, tp_size,
# dtype name length, extra count; then the dtype name, then each extra item.
_FIXED = struct.Struct("!3sBIIIIBIIBB")
_ITEM_INT = struct.Struct("!Bq")  # tag 0, value
_ITEM_TEXT = struct.Struct("!BB")  # tag 1, length; the UTF-8 text follows
_TAG_INT, _TAG_TEXT = 0, 1
#: The largest encoded layout.
MAX_LAYOUT_BYTES = (_FIXED.size + MAX_DTYPE_NAME_BYTES
                    + MAX_EXTRA_ITEMS * max(_ITEM_INT.size, _ITEM_TEXT.size + MAX_EXTRA_TEXT_BYTES))
_I64 = 2**63


def _dim(name: str, value: Any, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise LayoutError(name, value, f"an int in {low}..{high}")
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_of(name: str) -> torch.dtype | None:
    value = getattr(torch, name, None) if name.isidentifier() else None
    return value if isinstance(value, torch.dtype) else None


def _check_extra(extra: Any) -> tuple[int | str, ...]:
    if not isinstance(extra, (tuple, list)):
        raise LayoutError("extra", extra, "a tuple of ints and strs")
    items = tuple(extra)
    if len(items) > MAX_EXTRA_ITEMS:
        raise LayoutError("extra", extra, f"at most {MAX_EXTRA_ITEMS} items")
    for item in items:
        if type(item) is int:
            if not -_I64 <= item < _I64:
                raise LayoutError("extra", extra, "ints that fit in 64 bits")
        elif type(item) is str:
            if len(item.encode("utf-8")) > MAX_EXTRA_TEXT_BYTES:
                raise LayoutError("extra", extra,
                                  f"strs of at most {MAX_EXTRA_TEXT_BYTES} UTF-8 bytes")
        else:
            raise LayoutError("extra", extra, "a tuple of ints and strs")
    return items


@attrs.frozen
class LayoutDifference:
    """One field in which two layouts differ: ``field``, this side's value ``here`` and the
    other's ``there`` (canonical values: the dtype by name, ``extra`` as a tuple)."""

    field: str
    here: Any
    there: Any


@attrs.frozen
class KVLayout:
    """What a pool's blocks hold (module docstring). Fields are validated at construction
    (``LayoutError``); the value is immutable and hashable."""

    num_layers: int
    block_tokens: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    order: Order = "NHD"
    tp_rank: int = 0
    tp_size: int = 1
    extra: tuple[int | str, ...] = attrs.field(default=(), converter=_check_extra)

    def __attrs_post_init__(self) -> None:
        _dim("num_layers", self.num_layers, 1, MAX_LAYERS)
        _dim("block_tokens", self.block_tokens, 1, MAX_DIM)
        _dim("kv_heads", self.kv_heads, 1, MAX_DIM)
        _dim("head_dim", self.head_dim, 1, MAX_DIM)
        if not isinstance(self.dtype, torch.dtype):
            raise LayoutError("dtype", self.dtype, "a torch.dtype")
        if len(_dtype_name(self.dtype).encode()) > MAX_DTYPE_NAME_BYTES:
            raise LayoutError("dtype", self.dtype, "a dtype with a short name")
        if self.order not in _ORDERS:
            raise LayoutError("order", self.order, "'NHD' or 'HND'")
        _dim("tp_size", self.tp_size, 1, MAX_TP_SIZE)
        _dim("tp_rank", self.tp_rank, 0, self.tp_size - 1)

    # --- geometry --------------------------------------------------------------------------

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """One block of one layer's K (or V): ``(block_tokens, kv_heads, head_dim)`` for
        ``NHD``, ``(kv_heads, block_tokens, head_dim)`` for ``HND``."""
        if self.order == "NHD":
            return (self.block_tokens, self.kv_heads, self.head_dim)
        return (self.kv_heads, self.block_tokens, self.head_dim)

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block across every layer, K and V."""
        element = self.dtype.itemsize
        return 2 * self.num_layers * self.block_tokens * self.kv_heads * self.head_dim * element

    def blocks_for(self, num_tokens: int) -> int:
        """How many blocks hold ``num_tokens`` tokens (0 for 0)."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise LayoutError("num_tokens", num_tokens, "an int >= 0")
        return math.ceil(num_tokens / self.block_tokens)

    def token_index(self, blocks: torch.Tensor, slots: torch.Tensor) -> tuple[Any, ...]:
        """An index into a ``[num_blocks, *block_shape]`` tensor that selects token
        ``slots[i]`` of block ``blocks[i]`` for every ``i``: indexing with it gives (and
        assigning to it takes) ``[len(blocks), kv_heads, head_dim]`` in either order (the
        advanced indices around the head slice put the token axis first)."""
        if self.order == "NHD":
            return (blocks, slots)
        return (blocks, slice(None), slots)

    # --- description, comparison, fingerprint ---------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The canonical description: every field, in order, the dtype by name."""
        return {
            "num_layers": self.num_layers,
            "block_tokens": self.block_tokens,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "dtype": _dtype_name(self.dtype),
            "order": self.order,
            "tp_rank": self.tp_rank,
            "tp_size": self.tp_size,
            "extra": self.extra,
        }

    def diff(self, other: KVLayout) -> tuple[LayoutDifference, ...]:
        """Every field in which ``other`` differs, with both values (empty: equal)."""
        if not isinstance(other, KVLayout):
            raise LayoutError("other", other, "a KVLayout")
        mine, theirs = self.describe(), other.describe()
        return tuple(LayoutDifference(field, mine[field], theirs[field])
                     for field in mine if mine[field] != theirs[field])

    def check_matches(self, other: KVLayout, here: str = "here", there: str = "peer") -> None:
        """``LayoutMismatchError`` naming every differing field unless ``other`` is equal."""
        differences = self.diff(other)
        if differences:
            raise LayoutMismatchError([(d.field, d.here, d.there) for d in differences],
                                      here, there)

    def fingerprint(self, extra: Sequence[int | str] = ()) -> int:
        """The layout fingerprint (module docstring); ``extra`` is appended to the layout's
        own extras (the engine's ``layout_extra``)."""
        tags: list[int | str] = []
        if self.tp_size != 1:
            tags += [self.tp_rank, self.tp_size]
        if self.order != "NHD":
            tags.append(f"order={self.order}")
        return wire.layout_fingerprint(self.num_layers, self.block_shape, self.dtype,
                                       extra=(*tags, *self.extra, *extra))

    # --- binary form -----------------------------------------------------------------------

    def encode(self) -> bytes:
        """The compact binary form (at most ``MAX_LAYOUT_BYTES``); ``decode`` inverts it."""
        name = _dtype_name(self.dtype).encode()
        parts = [_FIXED.pack(_MAGIC, _VERSION, self.num_layers, self.block_tokens,
                             self.kv_heads, self.head_dim, _ORDERS.index(self.order),
                             self.tp_rank, self.tp_size, len(name), len(self.extra)), name]
        for item in self.extra:
            if type(item) is int:
                parts.append(_ITEM_INT.pack(_TAG_INT, item))
            else:
                text = str(item).encode("utf-8")
                parts += [_ITEM_TEXT.pack(_TAG_TEXT, len(text)), text]
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> KVLayout:
        """The layout ``encode`` wrote. ``LayoutDecodeError`` for anything else: wrong magic
        or version, too short or too long, a field out of range, an unknown dtype."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise LayoutDecodeError(f"expected bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) > MAX_LAYOUT_BYTES:
            raise LayoutDecodeError(f"{len(data)} bytes, more than {MAX_LAYOUT_BYTES}")
        if len(data) < _FIXED.size:
            raise LayoutDecodeError(f"{len(data)} bytes, shorter than the fixed part")
        (magic, version, num_layers, block_tokens, kv_heads, head_dim, order, tp_rank,
         tp_size, name_len, count) = _FIXED.unpack_from(data)
        if magic != _MAGIC:
            raise LayoutDecodeError(f"magic {magic!r}, expected {_MAGIC!r}")
        if version != _VERSION:
            raise LayoutDecodeError(f"version {version}, this side reads {_VERSION}")
        if order >= len(_ORDERS):
            raise LayoutDecodeError(f"order code {order}")
        if name_len > MAX_DTYPE_NAME_BYTES or count > MAX_EXTRA_ITEMS:
            raise LayoutDecodeError("the dtype name or the extras are too long")
        at = _FIXED.size
        name = data[at:at + name_len]
        at += name_len
        if len(name) != name_len:
            raise LayoutDecodeError("truncated in the dtype name")
        try:
            dtype_name = name.decode("ascii")
        except UnicodeDecodeError:
            raise LayoutDecodeError(f"dtype name {name!r} is not ASCII") from None
        dtype = _dtype_of(dtype_name)
        if dtype is None:
            raise LayoutDecodeError(f"unknown dtype {dtype_name!r}")
        extra: list[int | str] = []
        for _ in range(count):
            if at >= len(data):
                raise LayoutDecodeError("truncated in the extras")
            tag = data[at]
            if tag == _TAG_INT:
                if at + _ITEM_INT.size > len(data):
                    raise LayoutDecodeError("truncated in an int extra")
                extra.append(_ITEM_INT.unpack_from(data, at)[1])
                at += _ITEM_INT.size
            elif tag == _TAG_TEXT:
                if at + _ITEM_TEXT.size > len(data):
                    raise LayoutDecodeError("truncated in a text extra")
                length = _ITEM_TEXT.unpack_from(data, at)[1]
                at += _ITEM_TEXT.size
                raw = data[at:at + length]
                at += length
                if len(raw) != length:
                    raise LayoutDecodeError("truncated in a text extra")
                try:
                    extra.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise LayoutDecodeError("a text extra is not UTF-8") from None
            else:
                raise LayoutDecodeError(f"extra item tag {tag}")
        if at != len(data):
            raise LayoutDecodeError(f"{len(data) - at} trailing bytes")
        try:
            return cls(num_layers, block_tokens, kv_heads, head_dim, dtype, _ORDERS[order],
                       tp_rank, tp_size, tuple(extra))
        except LayoutError as exc:
            raise LayoutDecodeError(f"{exc.name}={exc.value!r}: expected {exc.expected}")\
                from None
