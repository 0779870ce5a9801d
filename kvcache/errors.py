"""Every exception of ``kvhandoff.kvcache``: a model's K/V that does not fit the pool's
layout, or a block table that cannot hold it. Raised before any block is written.
Attributes carry the data; messages say what to do."""

from __future__ import annotations

from typing import Any


class KVCacheError(Exception):
    """Base class of the model-cache helpers' errors."""


class KVShapeError(KVCacheError, ValueError):
    """A K/V tensor (or a cache) whose shape does not fit the pool's layout. Attributes:
    ``name`` (what is wrong: ``"key"``, ``"heads"``, ``"layer"``, ...), ``expected``,
    ``got``."""

    def __init__(self, name: str, expected: Any, got: Any) -> None:
        self.name = name
        self.expected = expected
        self.got = got
        super().__init__(f"{name}: expected {expected}, got {got!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.expected, self.got))


class KVDtypeError(KVCacheError, ValueError):
    """K/V of another dtype than the pool's: the helpers never cast (a bf16 model's cache
    written into a float16 pool would lose bits silently). Attributes: ``expected`` (the
    pool's dtype), ``got``. Build the pool with the model's dtype (``KVLayout(...,
    dtype=...)``, ``BlockPool.from_tensors`` takes it from the tensors)."""

    def __init__(self, expected: Any, got: Any) -> None:
        self.expected = expected
        self.got = got
        super().__init__(f"K/V dtype {got} does not match the pool's {expected}: build the "
                         "pool with the model's dtype (the helpers never cast)")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.expected, self.got))


class KVDeviceError(KVCacheError, ValueError):
    """K/V on another device than the pool. Attributes: ``expected``, ``got``."""

    def __init__(self, expected: Any, got: Any) -> None:
        self.expected = expected
        self.got = got
        super().__init__(f"K/V on {got}, the pool is on {expected}: move them first")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.expected, self.got))


class BlockTableError(KVCacheError, ValueError):
    """A block table that cannot take the tokens: too few blocks for ``start + tokens``,
    an id outside the pool, an id used twice, or one table per batch row expected.
    Attributes: ``problem``, ``block_ids`` (the ids concerned, possibly empty)."""

    def __init__(self, problem: str, block_ids: tuple[int, ...] = ()) -> None:
        self.problem = problem
        self.block_ids = tuple(block_ids)
        super().__init__(f"block table: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problem, self.block_ids))


class MissingExtraError(KVCacheError, ImportError):
    """An optional dependency is not installed. Attributes: ``package``, ``extra``."""

    def __init__(self, package: str, extra: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(f"{package} is not installed: pip install 'kvhandoff[{extra}]'")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.package, self.extra))
