"""Every exception raised by ``kvhandoff.engine`` itself (transports keep theirs in
``kvhandoff.engine.transports.errors``).

Errors carry their data as attributes; messages say what to do. A pool call that raises has
changed nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from kvhandoff.sessions import FailureReason


def _ids(block_ids: Iterable[int]) -> tuple[int, ...]:
    return tuple(block_ids)


def _show(block_ids: Sequence[int], limit: int = 16) -> str:
    shown = ", ".join(str(b) for b in block_ids[:limit])
    more = f", ... ({len(block_ids)} in all)" if len(block_ids) > limit else ""
    return f"[{shown}{more}]"


class PoolError(Exception):
    """Base class of every ``BlockPool`` error. ``block_ids`` (tuple of int) names the blocks
    concerned (empty when the error is not about particular blocks)."""

    block_ids: tuple[int, ...] = ()


class PoolConfigError(PoolError, ValueError):
    """A ``BlockPool`` constructor argument is invalid. Attributes: ``name``, ``value``."""

    def __init__(self, name: str, value: Any, expected: str):
        self.name = name
        self.value = value
        self.expected = expected
        self.block_ids = ()
        super().__init__(f"BlockPool {name}={value!r} is invalid: expected {expected}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.value, self.expected))


class OutOfBlocksError(PoolError):
    """``alloc(n)`` asked for more blocks than are free. Attributes: ``requested``,
    ``available``."""

    def __init__(self, requested: int, available: int):
        self.requested = requested
        self.available = available
        self.block_ids = ()
        super().__init__(
            f"cannot allocate {requested} blocks: only {available} are free; free or release "
            "finished requests first, or build the pool with more blocks"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.requested, self.available))


class UnknownBlockError(PoolError):
    """Block ids outside ``range(num_blocks)`` (or not ints). Attributes: ``block_ids`` (the
    bad ones), ``num_blocks``."""

    def __init__(self, block_ids: Iterable[Any], num_blocks: int):
        self.block_ids = tuple(block_ids)
        self.num_blocks = num_blocks
        super().__init__(
            f"unknown block ids {_show(self.block_ids)}: this pool has blocks 0..{num_blocks - 1}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.block_ids, self.num_blocks))


class DoubleFreeError(PoolError):
    """``free()`` of blocks that are already free, already freed (deferred while pinned), or
    listed twice in one call. Attribute: ``block_ids``."""

    def __init__(self, block_ids: Iterable[int]):
        self.block_ids = _ids(block_ids)
        super().__init__(
            f"blocks {_show(self.block_ids)} were already freed (or are listed twice): free "
            "each allocated block exactly once"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.block_ids,))


class NotOwnerError(PoolError):
    """``free()`` of blocks that the caller does not hold. Attributes: ``block_ids``,
    ``owner`` (who tried), ``holders`` (block id -> who holds it)."""

    def __init__(self, block_ids: Iterable[int], owner: str | None,
                 holders: dict[int, str | None]):
        self.block_ids = _ids(block_ids)
        self.owner = owner
        self.holders = dict(holders)
        super().__init__(
            f"owner {owner!r} does not hold blocks {_show(self.block_ids)} (holders: "
            f"{self.holders}); free blocks with the owner they were allocated for"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.block_ids, self.owner, self.holders))


class PinError(PoolError):
    """A ``pin``/``unpin`` that cannot be honoured: pinning a free or already freed block,
    pinning twice for one owner, or unpinning a block the owner did not pin. Attributes:
    ``block_ids``, ``owner``, ``problem`` (what was wrong)."""

    def __init__(self, block_ids: Iterable[int], owner: str, problem: str):
        self.block_ids = _ids(block_ids)
        self.owner = owner
        self.problem = problem
        super().__init__(f"cannot pin/unpin blocks {_show(self.block_ids)} for {owner!r}: "
                         f"{problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.block_ids, self.owner, self.problem))


class PoisonError(PoolError):
    """Debug mode: blocks on the free list were written after they were freed (their poison
    pattern changed), i.e. something touched memory it no longer owned. Attribute:
    ``block_ids``."""

    def __init__(self, block_ids: Iterable[int]):
        self.block_ids = _ids(block_ids)
        super().__init__(
            f"freed blocks {_show(self.block_ids)} were written after free: a transfer or "
            "kernel used them past their release"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.block_ids,))


class PoolInvariantError(PoolError):
    """``check()`` found the pool's books inconsistent. Attributes: ``problems`` (list of
    str), ``block_ids`` (every block named by a problem)."""

    def __init__(self, problems: Sequence[str], block_ids: Iterable[int] = ()):
        self.problems = list(problems)
        self.block_ids = _ids(block_ids)
        super().__init__("block pool invariant broken: " + "; ".join(self.problems))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problems, self.block_ids))


# --- the transfer engine ---------------------------------------------------------------------


class EngineError(Exception):
    """Base class of the errors the transfer engine raises to its caller."""


class EngineConfigError(EngineError, ValueError):
    """A bad argument or configuration value (``name``, ``value``, what was ``expected``);
    raised where it is given, before anything changes."""

    def __init__(self, name: str, value: Any, expected: str) -> None:
        self.name = name
        self.value = value
        self.expected = expected
        super().__init__(f"{name}={value!r} is invalid: expected {expected}")


class EngineClosedError(EngineError, RuntimeError):
    """The engine is draining or closed and admits no new transfer (``request_id``)."""

    def __init__(self, request_id: str, detail: str = "the engine is closed") -> None:
        self.request_id = request_id
        self.detail = detail
        super().__init__(f"{request_id!r}: {detail}; create a new engine to transfer more")


class LayerReadyError(EngineError, ValueError):
    """``layer_ready(layer)`` on a handle that cannot take it (not a layer-wise send, an
    index out of range, or a layer already marked)."""

    def __init__(self, request_id: str, layer: Any, expected: str) -> None:
        self.request_id = request_id
        self.layer = layer
        self.expected = expected
        super().__init__(f"layer_ready({layer!r}) on {request_id!r}: expected {expected}")


class DataTagsExhaustedError(EngineError, RuntimeError):
    """A receive needs ``needed`` consecutive data tags (one per chunk: one, or one per layer
    for a layer-wise receive) and the transport's tag space (``max_tag``) has no free range
    that large while the transfers in flight hold theirs. Raised before anything changed:
    retry once transfers finish, receive whole-request instead of layer-wise, or use a
    transport with a larger tag space."""

    def __init__(self, request_id: str, needed: int, max_tag: int, in_use: int) -> None:
        self.request_id = request_id
        self.needed = needed
        self.max_tag = max_tag
        self.in_use = in_use
        super().__init__(
            f"receive {request_id!r} needs {needed} consecutive data tags, but no free range "
            f"that large is left among tags 1..{max_tag} ({in_use} in use by transfers in "
            "flight): retry when transfers finish, or receive without layerwise=True")


class TransferError(EngineError):
    """A transfer did not complete. ``reason`` is a ``FailureReason`` (``PEER_LOST``,
    ``TRANSFER_TIMEOUT``, ...; a ``str`` enum, so ``str(reason)`` is its value and it equals
    that string), ``detail`` free text (for a failure on another TP rank or on the peer, which
    rank and why). The blocks stay pinned until the transport is quiescent: freeing them is
    always safe (the pool defers it).

    ``outcome_unknown`` is True when this side could not learn the other side's outcome: a
    sender that posted gave up without its receiver's word (``peer_lost``: the receiver went
    silent; ``transfer_timeout``: it never answered), so the receiver may hold every byte.
    The host must not treat the request as handed off, nor as certainly lost (ask the decode
    side, or redo the prefill)."""

    def __init__(self, request_id: str, reason: FailureReason | str,
                 detail: str | None = None, outcome_unknown: bool = False) -> None:
        self.request_id = request_id
        self.reason = FailureReason(reason)
        self.detail = detail
        self.outcome_unknown = bool(outcome_unknown)
        text = f"transfer {request_id!r} failed: {self.reason}"
        if self.outcome_unknown:
            text += " (outcome unknown: the peer may have every byte)"
        super().__init__(f"{text} ({detail})" if detail else text)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.request_id, self.reason, self.detail, self.outcome_unknown))


class TransferTimeout(TransferError):
    """The queue deadline (before the handshake) or the transfer deadline (after it)
    passed. Check the peer's health and the ``kvhandoff analyze`` report of both sides."""


class TransferFailed(TransferError):
    """The transport, the peer or another rank of the TP group failed the transfer."""


class TransferCancelled(TransferError):
    """The transfer was cancelled (by this host, by the peer, or on another TP rank)."""


# --- KV layouts and adopted memory -----------------------------------------------------------


class LayoutError(PoolConfigError):
    """A ``KVLayout`` field is invalid (a ``PoolConfigError``: a pool built from it was given
    a bad argument). Attributes: ``name`` (the field), ``value``, ``expected``."""

    def __init__(self, name: str, value: Any, expected: str) -> None:
        self.name = name
        self.value = value
        self.expected = expected
        self.block_ids = ()
        Exception.__init__(self, f"KVLayout {name}={value!r} is invalid: expected {expected}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.value, self.expected))


class LayoutDecodeError(PoolError, ValueError):
    """Bytes that are not a valid encoded ``KVLayout`` (wrong magic or version, truncated,
    trailing bytes, a field out of range, an unknown dtype). Attribute: ``problem``."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        self.block_ids = ()
        super().__init__(f"not a valid encoded KV layout: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problem,))


class LayoutMismatchError(PoolError, ValueError):
    """Two KV layouts that must agree differ. ``differences`` is a tuple of
    ``(field, here, there)``, one per differing field, in the layout's field order; ``here``
    and ``there`` name the two sides (``"here"``/``"peer"`` for a handshake,
    ``"layout"``/``"tensors"`` for an adoption)."""

    def __init__(self, differences: Sequence[tuple[str, Any, Any]], here: str = "here",
                 there: str = "peer") -> None:
        self.differences = tuple((str(f), a, b) for f, a, b in differences)
        self.here = here
        self.there = there
        self.block_ids = ()
        listed = "; ".join(f"{f}: {here} {a!r}, {there} {b!r}" for f, a, b in self.differences)
        super().__init__(f"KV layouts differ in {len(self.differences)} field(s): {listed}; "
                         "build both sides' pools with the same layout")

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f for f, _, _ in self.differences)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.differences, self.here, self.there))


class AdoptError(PoolError, ValueError):
    """``BlockPool.from_tensors`` refused the host's tensors, before anything changed.
    Attributes: ``index`` (which tensor of the list, None for the list itself), ``field``
    (``"type"``, ``"dtype"``, ``"device"``, ``"shape"``, ``"contiguous"``, ``"overlap"``,
    ``"requires_grad"``, ``"count"``, ``"interleaved"``), ``expected``, ``got``."""

    def __init__(self, index: int | None, field: str, expected: Any, got: Any) -> None:
        self.index = index
        self.field = field
        self.expected = expected
        self.got = got
        self.block_ids = ()
        where = "the tensor list" if index is None else f"tensor {index}"
        super().__init__(f"cannot adopt {where}: {field} is {got!r}, expected {expected}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.index, self.field, self.expected, self.got))


class PoolModeError(PoolError, RuntimeError):
    """A call the pool's allocation mode does not offer: ``alloc``/``free`` (and the free
    books) on a host-owned pool, whose host's allocator owns them, or ``finished()`` on a
    pool that defers frees itself. Attributes: ``call``, ``host_owned``."""

    def __init__(self, call: str, host_owned: bool) -> None:
        self.call = call
        self.host_owned = host_owned
        self.block_ids = ()
        if host_owned:
            text = (f"{call} is the host's on a host-owned pool: allocate and free with the "
                    "host's allocator, and reuse a request's blocks once finished() names it")
        else:
            text = (f"{call} is offered by host-owned pools only "
                    "(BlockPool.from_tensors(..., host_owned=True)); this pool defers frees "
                    "itself: free() at any time")
        super().__init__(text)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.call, self.host_owned))
