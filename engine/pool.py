"""``BlockPool``: paged KV memory, handed out by block id, with pins that defer frees.

Memory is one torch tensor per layer for K and one for V, each ``[num_blocks,
*block_shape]``, in ``pool.layers`` as the flat list ``[K0, V0, K1, V1, ...]`` that
``kvhandoff.cuda_ext.gather`` / ``scatter`` take. ``pool.layout`` (a ``KVLayout``) is the one
description of a block's bytes: ``block_shape`` is ``[block_tokens, kv_heads, head_dim]``
(``NHD``, the default) or ``[kv_heads, block_tokens, head_dim]`` (``HND``).

Whose memory. ``BlockPool(...)`` and ``BlockPool.from_layout`` allocate it;
``BlockPool.from_tensors`` adopts the host's own tensors (kvhandoff's flat list, or vLLM's
``[2, num_blocks, ...]`` per layer) as views, without a copy, after checking them.

Whose allocator. By default the pool's: the books below. With ``host_owned=True`` (adopted
memory only) the host's allocator keeps alloc/free and the pool keeps only the pins; when
the last pin of an owner (a request id) is removed, the owner is queued for ``finished()``,
which tells the host which requests' blocks no transfer touches any more: the same promise as
the deferred free below, reported instead of acted on (as vLLM's connector reports requests
from ``get_finished()``).

Every block is in exactly one of three books:

* **free** - on the free list, handed out by ``alloc``;
* **allocated** - held by an owner (the host's request, or anonymous), returned by ``free``;
* **deferred** - its holder freed it while a transfer had it pinned: it goes back to the free
  list when the last pin is removed, never earlier (promise 2 of docs/design.md).

Pins are orthogonal: a transfer pins the blocks it moves (``pin(ids, owner=request_id)``) and
unpins them once its session is quiescent. A free block can never be pinned, and a pinned
block never reaches the free list.

A transfer may move tens of thousands of blocks, so the books are kept for whole-set work:
the pins are one set of blocks per transfer plus the set of pinned blocks, and validation and
bookkeeping run as set operations and C-level passes over the ids rather than a Python step
per block (a per-block pin count is kept only for the rare block that several transfers pin).

Every call validates all its arguments before it changes anything, so an error leaves the
pool exactly as it was. ``check()`` verifies the books. ``debug=True`` poisons blocks as they
reach the free list (NaN for floating dtypes, the byte ``0xA5`` otherwise) and verifies the
poison when they leave it, so a late write through a stale block id is caught; a late read
sees NaN.
"""

from __future__ import annotations

import itertools
import operator
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch
from kvhandoff.engine._pool_memory import adopted_layers, check_against, zeroed_layer
from kvhandoff.engine.errors import (
    DoubleFreeError,
    NotOwnerError,
    OutOfBlocksError,
    PinError,
    PoisonError,
    PoolConfigError,
    PoolError,
    PoolInvariantError,
    PoolModeError,
    UnknownBlockError,
)
from kvhandoff.engine.layout import KVLayout, Order
from kvhandoff.sessions import BlockIds

#: Fill byte for poisoned blocks of non-floating dtypes.
POISON_BLOCK_BYTE = 0xA5

_EXACT_INT = frozenset({int})
#: Up to this many ids a plain loop validates them faster than the C-level passes.
_LOOP_MAX = 16


class PoolLogger(Protocol):
    """What the pool needs from a logger: structlog's bound-logger ``info``."""

    def info(self, event: str, **kw: Any) -> Any: ...


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PoolConfigError(name, value, "a positive int")
    return value


def _device(device: Any) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise PoolConfigError("device", device, "a torch device such as 'cpu' or 'cuda:0'")\
            from None


def _refuse_repeated_owner(owners: list[str]) -> None:
    """``PinError`` naming the first owner listed twice in one batch, if any."""
    if len(set(owners)) == len(owners):
        return
    seen: set[str] = set()
    for owner in owners:
        if owner in seen:
            raise PinError((), owner, "an owner is listed twice in one batch")
        seen.add(owner)


class BlockPool:
    """Paged KV memory for one rank. Not thread-safe: one owner (the engine loop) calls it.

    ``alloc(n, owner)`` -> block ids; ``free(ids, owner)`` returns them (deferred while
    pinned); ``pin`` / ``unpin`` by transfer; ``check()`` verifies the books. Errors are
    ``kvhandoff.engine.errors.PoolError`` subclasses and leave the pool unchanged.
    """

    def __init__(
        self,
        num_blocks: int,
        num_layers: int,
        block_tokens: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
        debug: bool = False,
        logger: PoolLogger | None = None,
    ) -> None:
        # ``dtype`` keeps its float16 default: existing pools (and their layout fingerprints)
        # rely on it. ``from_layout`` and ``from_tensors`` take the dtype from the layout or
        # the host's tensors instead, and the model-cache helpers (``kvhandoff.kvcache``)
        # refuse K/V of another dtype rather than cast them into the pool.
        _positive_int("num_blocks", num_blocks)
        for name, value in (("num_layers", num_layers), ("block_tokens", block_tokens),
                            ("kv_heads", kv_heads), ("head_dim", head_dim)):
            _positive_int(name, value)
        if not isinstance(dtype, torch.dtype):
            raise PoolConfigError("dtype", dtype, "a torch.dtype")
        layout = KVLayout(num_layers, block_tokens, kv_heads, head_dim, dtype)
        self._own(layout, num_blocks, _device(device), debug, logger)

    @classmethod
    def from_layout(cls, layout: KVLayout, num_blocks: int, *,
                    device: torch.device | str = "cpu", debug: bool = False,
                    logger: PoolLogger | None = None) -> BlockPool:
        """A pool that allocates its own memory for ``layout`` (either order; the dtype is
        the layout's)."""
        if not isinstance(layout, KVLayout):
            raise PoolConfigError("layout", layout, "a KVLayout")
        _positive_int("num_blocks", num_blocks)
        pool = cls.__new__(cls)
        pool._own(layout, num_blocks, _device(device), debug, logger)
        return pool

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor], *, order: Order = "NHD",
                     layout: KVLayout | None = None, host_owned: bool = False,
                     tp_rank: int = 0, tp_size: int = 1, extra: Sequence[int | str] = (),
                     debug: bool = False, logger: PoolLogger | None = None) -> BlockPool:
        """A pool over KV memory the host already has: ``pool.layers`` are views of
        ``tensors``, nothing is copied, and writes through either side are seen by the
        other. ``tensors`` is one of:

        * ``[K0, V0, K1, V1, ...]``, each ``[num_blocks, *block_shape]`` (kvhandoff's own);
        * one tensor per layer, ``[2, num_blocks, *block_shape]`` (vLLM's): K is ``t[0]``,
          V is ``t[1]``.

        ``block_shape`` is ``(block_tokens, kv_heads, head_dim)`` for ``order="NHD"`` and
        ``(kv_heads, block_tokens, head_dim)`` for ``"HND"``. A per-layer tensor with K and V
        interleaved inside each block (``[num_blocks, 2, *block_shape]``) is refused: its K
        and V views are strided, and the block copy (``cuda_ext.gather``/``scatter``) moves
        contiguous layer tensors only.

        The layout (num_layers, the block geometry, the dtype) is read from the tensors,
        with ``order``, ``tp_rank``, ``tp_size`` and ``extra`` added; pass ``layout`` to
        have the tensors checked against an expected one instead (``LayoutMismatchError``
        names every differing field). The tensors must share dtype, device and shape, be
        contiguous, not require grad and not overlap (``AdoptError`` otherwise).

        ``host_owned=True``: the host's allocator owns alloc/free; the pool only pins
        (``alloc``/``free`` raise ``PoolModeError``) and ``finished()`` names the requests
        whose blocks no transfer touches any more. ``debug=True`` (pool-owned only) poisons
        every block at once: the host's contents are overwritten.
        """
        if host_owned and debug:
            raise PoolConfigError(
                "debug", debug, "debug=False on a host-owned pool: the host's allocator owns "
                "the free blocks, so poison them there")
        layers = adopted_layers(tensors)
        first = layers[0]
        if layout is None:
            if order not in ("NHD", "HND"):
                raise PoolConfigError("order", order, "'NHD' or 'HND'")
            shape = tuple(first.shape[1:])
            tokens, heads = (shape[0], shape[1]) if order == "NHD" else (shape[1], shape[0])
            layout = KVLayout(len(layers) // 2, tokens, heads, shape[2], first.dtype, order,
                              tp_rank, tp_size, tuple(extra))
        elif not isinstance(layout, KVLayout):
            raise PoolConfigError("layout", layout, "a KVLayout")
        else:
            check_against(layout, layers)
        pool = cls.__new__(cls)
        pool._setup(layout, layers, first.device, debug, logger, host_owned=host_owned)
        return pool

    def _own(self, layout: KVLayout, num_blocks: int, device: torch.device, debug: bool,
             logger: PoolLogger | None) -> None:
        shape = (num_blocks, *layout.block_shape)
        layers = [zeroed_layer(shape, layout.dtype, device) for _ in range(2 * layout.num_layers)]
        self._setup(layout, layers, device, debug, logger, host_owned=False)

    def _setup(self, layout: KVLayout, layers: list[torch.Tensor], device: torch.device,
               debug: bool, logger: PoolLogger | None, *, host_owned: bool) -> None:
        #: The one description of the blocks' bytes (``kvhandoff.engine.KVLayout``).
        self.layout = layout
        self.num_blocks = num_blocks = layers[0].shape[0]
        self.num_layers = layout.num_layers
        self.block_tokens = layout.block_tokens
        self.kv_heads = layout.kv_heads
        self.head_dim = layout.head_dim
        self.dtype = layout.dtype
        self.device = device
        self.debug = bool(debug)
        #: True: the host's allocator owns alloc/free, the pool only pins (``finished()``).
        self.host_owned = bool(host_owned)
        self._logger = logger
        #: ``[K0, V0, K1, V1, ...]``, each ``[num_blocks, *block_shape]``.
        self.layers: list[torch.Tensor] = layers
        # A host-owned pool has no free list: no block is free in its books, so pins apply
        # to any known block and nothing is ever deferred.
        self._free: deque[int] = deque() if host_owned else deque(range(num_blocks))
        self._is_free = bytearray(num_blocks) if host_owned else bytearray(b"\x01") * num_blocks
        self._holder: dict[int, str | None] = {}  # allocated: block -> owner
        self._deferred: dict[int, str | None] = {}  # freed while pinned: block -> last owner
        self._pinned_by: dict[str, set[int]] = {}  # transfer -> blocks it pins
        self._pins: set[int] = set()  # blocks that at least one transfer pins
        self._shared_pins: dict[int, int] = {}  # block -> transfers pinning it, only when >= 2
        # Host-owned: the owners whose last pin was removed, not yet reported by finished().
        self._finished: list[str] = []
        if self.debug:
            self._poison(range(num_blocks))

    # --- geometry --------------------------------------------------------------------------

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """One block of one layer's K (or V): ``(block_tokens, kv_heads, head_dim)``, or
        ``(kv_heads, block_tokens, head_dim)`` for an ``HND`` layout."""
        return self.layout.block_shape

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block across every layer, K and V."""
        return self.layout.block_nbytes

    def key(self, layer: int) -> torch.Tensor:
        return self.layers[2 * layer]

    def value(self, layer: int) -> torch.Tensor:
        return self.layers[2 * layer + 1]

    # --- counts and queries ----------------------------------------------------------------

    @property
    def num_free(self) -> int:
        if self.host_owned:
            raise PoolModeError("num_free", True)
        return len(self._free)

    @property
    def num_allocated(self) -> int:
        """Blocks held by an owner (not counting deferred ones)."""
        if self.host_owned:
            raise PoolModeError("num_allocated", True)
        return len(self._holder)

    @property
    def num_deferred(self) -> int:
        """Blocks freed by their holder but still pinned by a transfer."""
        return len(self._deferred)

    @property
    def num_pinned(self) -> int:
        """Blocks that at least one transfer pins."""
        return len(self._pins)

    def is_free(self, block_id: int) -> bool:
        if self.host_owned:
            raise PoolModeError("is_free", True)
        self._check_known([block_id])
        return bool(self._is_free[block_id])

    def holder(self, block_id: int) -> str | None:
        """Who holds an allocated block (None: anonymous); ``PoolError`` if not allocated."""
        if self.host_owned:
            raise PoolModeError("holder", True)
        self._check_known([block_id])
        if block_id not in self._holder:
            raise PoolError(f"block {block_id} is not allocated")
        return self._holder[block_id]

    def pins(self, block_id: int) -> frozenset[str]:
        """The transfers pinning ``block_id`` (empty when none)."""
        (block_id,) = self._check_known([block_id])
        if block_id not in self._pins:
            return frozenset()
        return frozenset(owner for owner, blocks in self._pinned_by.items() if block_id in blocks)

    def pinned_by(self, owner: str) -> frozenset[int]:
        """The blocks ``owner`` pins."""
        return frozenset(self._pinned_by.get(owner, ()))

    def deferred_blocks(self) -> frozenset[int]:
        return frozenset(self._deferred)

    def finished(self) -> list[str]:
        """Host-owned pools: the owners (request ids) whose last pin was removed since the
        previous call, in that order, each once per time its pins dropped to zero. Their
        blocks are safe to reuse: the engine unpins a transfer only once every rank's
        transport is done with it. ``PoolModeError`` on a pool that defers frees itself."""
        if not self.host_owned:
            raise PoolModeError("finished()", False)
        done, self._finished = self._finished, []
        return done

    # --- alloc / free ----------------------------------------------------------------------

    def alloc(self, n: int, owner: str | None = None) -> list[int]:
        """Take ``n`` blocks off the free list for ``owner`` (None: anonymous) and return
        their ids. ``OutOfBlocksError`` when fewer are free; in debug mode ``PoisonError``
        when one of them was written while free."""
        if self.host_owned:
            raise PoolModeError("alloc", True)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise PoolConfigError("n", n, "an int >= 0")
        if n > len(self._free):
            raise OutOfBlocksError(n, len(self._free))
        free_list = self._free
        taken = list(itertools.islice(free_list, n))  # indexing a deque mid-way is O(n)
        if self.debug and taken:
            written = self._unpoisoned(taken)
            if written:
                raise PoisonError(written)
        if n == len(free_list):
            free_list.clear()
        else:
            popleft = free_list.popleft
            for _ in range(n):
                popleft()
        is_free = self._is_free
        for block_id in taken:
            is_free[block_id] = 0
        self._holder.update(dict.fromkeys(taken, owner))
        return taken

    def free(self, block_ids: Iterable[int], owner: str | None = None) -> list[int]:
        """Give blocks back. Blocks that a transfer still pins are *deferred*: they return to
        the free list on their last ``unpin`` (and a ``pool.deferred_free`` event with
        ``phase="deferred"`` is logged). Returns the ids that reached the free list now.

        Raises ``UnknownBlockError``, ``DoubleFreeError`` (already free or freed, or listed
        twice) or ``NotOwnerError`` (held by someone else), changing nothing."""
        if self.host_owned:
            raise PoolModeError("free", True)
        ids = self._check_known(block_ids)
        id_set = set(ids)
        if (len(id_set) != len(ids) or self._any_free(ids)
                or (self._deferred and not id_set.isdisjoint(self._deferred))):
            twice = [b for b, n in Counter(ids).items() if n > 1]
            already = [b for b in ids if self._is_free[b] or b in self._deferred]
            raise DoubleFreeError(sorted(set(twice) | set(already)))
        holder = self._holder
        # Every id is allocated now. For a str or None owner a count over the holders is
        # exactly "every holder == owner"; anything else takes the per-block comparison.
        if (owner is not None and type(owner) is not str) or list(
                map(holder.__getitem__, ids)).count(owner) != len(ids):
            not_held = [b for b in ids if holder[b] != owner]
            if not_held:
                raise NotOwnerError(not_held, owner, {b: holder[b] for b in not_held})

        for block_id in ids:
            del holder[block_id]
        released: list[int] = ids
        deferred: dict[str, list[int]] = {}
        if self._pins and not id_set.isdisjoint(self._pins):
            pinned = id_set & self._pins
            released = [b for b in ids if b not in pinned]
            pinners_of = self._pinners_of(pinned)
            for block_id in ids:
                if block_id in pinned:
                    self._deferred[block_id] = owner
                    for pinner in pinners_of[block_id]:
                        deferred.setdefault(pinner, []).append(block_id)
        self._release(released)
        for pinner, blocks in deferred.items():
            self._log(blocks, pinner, "deferred")
        return released

    # --- pins ------------------------------------------------------------------------------

    def pin(self, block_ids: Iterable[int], owner: str) -> None:
        """Pin allocated blocks for the transfer ``owner`` (a request id): until
        ``unpin(ids, owner)`` a ``free()`` of them is deferred. ``PinError`` when a block is
        free, was already freed by its holder, or is already pinned by ``owner``. On a
        host-owned pool any block may be pinned (the host vouches that it is allocated)."""
        self._add_pin(owner, self._check_pin(block_ids, owner))

    def pin_many(self, pins: Sequence[tuple[Iterable[int], str]]) -> None:
        """``pin`` for several transfers at once, ``(block_ids, owner)`` each, all or none:
        every pin is checked (and no owner may appear twice) before any is made, so a
        ``PinError`` leaves the pool as it was."""
        checked = [(owner, self._check_pin(block_ids, owner)) for block_ids, owner in pins]
        _refuse_repeated_owner([owner for owner, _ in checked])
        for owner, id_set in checked:
            self._add_pin(owner, id_set)

    def _check_pin(self, block_ids: Iterable[int], owner: str) -> set[int]:
        self._check_owner(owner)
        ids = self._check_known(block_ids)
        id_set = set(ids)
        if len(id_set) != len(ids):
            raise PinError(ids, owner, "a block id is listed twice")
        if self._any_free(ids):
            free = [b for b in ids if self._is_free[b]]
            raise PinError(free, owner, "the blocks are free: allocate them first")
        if self._deferred and not id_set.isdisjoint(self._deferred):
            freed = [b for b in ids if b in self._deferred]
            raise PinError(freed, owner, "their holder already freed them")
        mine = self._pinned_by.get(owner)
        if mine is not None and not mine.isdisjoint(id_set):
            twice = [b for b in ids if b in mine]
            raise PinError(twice, owner, "already pinned by this owner")
        return id_set

    def _add_pin(self, owner: str, id_set: set[int]) -> None:
        pins = self._pins
        if not pins.isdisjoint(id_set):  # blocks that other transfers pin too
            shared = self._shared_pins
            for block_id in pins & id_set:
                shared[block_id] = shared.get(block_id, 1) + 1
        pins |= id_set
        mine = self._pinned_by.get(owner)
        if mine is None:
            self._pinned_by[owner] = id_set
        else:
            mine |= id_set

    def unpin(self, block_ids: Iterable[int], owner: str) -> list[int]:
        """Remove ``owner``'s pin from the blocks. Deferred blocks whose last pin this was go
        back to the free list (logged as ``pool.deferred_free`` with ``phase="released"``);
        their ids are returned. ``PinError`` when ``owner`` does not pin one of them."""
        ids, id_set = self._check_unpin(block_ids, owner)
        return self._remove_pins([(owner, ids, id_set)])

    def unpin_many(self, pins: Sequence[tuple[Iterable[int], str]]) -> list[int]:
        """``unpin`` for several transfers at once, ``(block_ids, owner)`` each, all or
        none: every one is checked (and no owner may appear twice) before any pin is
        removed. The deferred blocks whose last pin went come back to the free list in one
        step (poisoned together in debug mode); their ids are returned."""
        checked = [(owner, *self._check_unpin(block_ids, owner)) for block_ids, owner in pins]
        _refuse_repeated_owner([owner for owner, _, _ in checked])
        return self._remove_pins(checked)

    def _check_unpin(self, block_ids: Iterable[int], owner: str) -> tuple[list[int], set[int]]:
        self._check_owner(owner)
        ids = self._check_known(block_ids)
        id_set = set(ids)
        if len(id_set) != len(ids):
            raise PinError(ids, owner, "a block id is listed twice")
        mine = self._pinned_by.get(owner)
        if mine is None or not id_set <= mine:
            missing = [b for b in ids if mine is None or b not in mine]
            if missing:
                raise PinError(missing, owner, "this owner does not pin them")
        return ids, id_set

    def _remove_pins(self, checked: Sequence[tuple[str, list[int], set[int]]]) -> list[int]:
        """Remove checked pins; release (and log, per owner) the deferred blocks whose last
        pin went."""
        shared, pinned_by, deferred = self._shared_pins, self._pinned_by, self._deferred
        released: list[int] = []
        logs: list[tuple[list[int], str]] = []
        for owner, ids, id_set in checked:
            mine = pinned_by.get(owner)
            if mine is None:
                continue  # nothing listed, and this owner pins nothing
            unpinned = id_set  # the blocks that no transfer pins any more
            if shared and not id_set.isdisjoint(shared):
                still = id_set.intersection(shared)
                for block_id in still:
                    left = shared[block_id] - 1
                    if left > 1:
                        shared[block_id] = left
                    else:
                        del shared[block_id]
                unpinned = id_set - still
            self._pins -= unpinned
            if len(id_set) == len(mine):  # a subset of the same size: all of them
                del pinned_by[owner]
                if self.host_owned:
                    self._finished.append(owner)
            else:
                mine -= id_set
            if deferred:
                due = deferred.keys() & unpinned
                if due:
                    mine_released = [b for b in ids if b in due]
                    for block_id in mine_released:
                        del deferred[block_id]
                    released.extend(mine_released)
                    logs.append((mine_released, owner))
        self._release(released)
        for blocks, owner in logs:
            self._log(blocks, owner, "released")
        return released

    def unpin_all(self, owner: str) -> list[int]:
        """``unpin`` every block ``owner`` pins (none is fine); returns the released ids."""
        blocks = sorted(self._pinned_by.get(owner, ()))
        return self.unpin(blocks, owner) if blocks else []

    # --- verification ----------------------------------------------------------------------

    def check(self) -> None:
        """Verify the books: every block is in exactly one of free / allocated / deferred, no
        id twice on the free list, no free block pinned, every deferred block pinned, and the
        pin indexes agree. ``PoolInvariantError`` lists every problem found."""
        problems: list[str] = []
        bad: set[int] = set()
        if self.host_owned:  # no free or allocated books: the host's allocator keeps them
            if self._free or any(self._is_free) or self._holder or self._deferred:
                problems.append("a host-owned pool holds free, allocated or deferred books")
        free_list = list(self._free)
        free_set = set(free_list)
        if len(free_set) != len(free_list):
            dups = sorted(b for b in free_set if free_list.count(b) > 1)
            problems.append(f"free list holds ids twice: {dups}")
            bad.update(dups)
        for block_id in range(0 if self.host_owned else self.num_blocks):
            books = (
                (block_id in free_set) + (block_id in self._holder) + (block_id in self._deferred)
            )
            if books != 1:
                problems.append(f"block {block_id} is in {books} books (free/allocated/deferred)")
                bad.add(block_id)
            if bool(self._is_free[block_id]) != (block_id in free_set):
                problems.append(f"block {block_id}: free flag disagrees with the free list")
                bad.add(block_id)
        for block_id in self._pins:
            if block_id in free_set:
                problems.append(f"block {block_id} is pinned but on the free list")
                bad.add(block_id)
        for block_id in self._deferred:
            if block_id not in self._pins:
                problems.append(f"block {block_id} is deferred but nothing pins it")
                bad.add(block_id)
        # The per-block pin indexes must follow from the per-transfer sets exactly.
        pin_counts = Counter(b for blocks in self._pinned_by.values() for b in blocks)
        shared = {b: n for b, n in pin_counts.items() if n > 1}
        wrong = set(pin_counts).symmetric_difference(self._pins)
        wrong.update(b for b in shared.keys() | self._shared_pins.keys()
                     if shared.get(b) != self._shared_pins.get(b))
        if wrong:
            problems.append("the pin indexes disagree")
            bad.update(wrong)
        if problems:
            raise PoolInvariantError(problems, sorted(bad))

    def assert_poisoned(self, block_ids: Iterable[int] | None = None) -> None:
        """Debug mode: ``PoisonError`` unless every given block (default: every free block)
        still holds its poison, i.e. nothing wrote it since it was freed. The blocks must be
        free."""
        if not self.debug:
            raise PoolConfigError("debug", self.debug, "debug=True to check poisoned blocks")
        ids = list(self._free) if block_ids is None else self._check_known(block_ids)
        not_free = [b for b in ids if not self._is_free[b]]
        if not_free:
            raise PoolError(f"blocks {not_free} are not free, so they are not poisoned")
        written = self._unpoisoned(ids)
        if written:
            raise PoisonError(written)

    # --- internals -------------------------------------------------------------------------

    def _check_known(self, block_ids: Iterable[Any]) -> list[int]:
        if type(block_ids) is BlockIds:  # validated once already (check_block_ids)
            if block_ids and max(block_ids) >= self.num_blocks:
                raise UnknownBlockError([b for b in block_ids if b >= self.num_blocks],
                                        self.num_blocks)
            return list(block_ids)
        if isinstance(block_ids, (str, bytes)):
            raise UnknownBlockError([block_ids], self.num_blocks)
        seq = block_ids if isinstance(block_ids, (tuple, list)) else list(block_ids)
        if (len(seq) > _LOOP_MAX and _EXACT_INT.issuperset(map(type, seq))
                and min(seq) >= 0 and max(seq) < self.num_blocks):
            return list(seq)  # only exact ints (no bool), all in range: C-level passes
        ids: list[int] = []
        bad: list[Any] = []
        for raw in seq:
            try:  # ints, numpy ints and integer 0-d tensors; never bools or floats
                block_id = operator.index(raw) if not isinstance(raw, bool) else -1
            except TypeError:
                block_id = -1
            if 0 <= block_id < self.num_blocks:
                ids.append(block_id)
            else:
                bad.append(raw)
        if bad:
            raise UnknownBlockError(bad, self.num_blocks)
        return ids

    def _any_free(self, ids: list[int]) -> bool:
        return any(map(self._is_free.__getitem__, ids))

    def _pinners_of(self, blocks: set[int]) -> dict[int, list[str]]:
        """The transfers pinning each of ``blocks``, sorted."""
        pinners: dict[int, list[str]] = {b: [] for b in blocks}
        for owner, pinned in self._pinned_by.items():
            for block_id in pinned & blocks:
                pinners[block_id].append(owner)
        for owners in pinners.values():
            owners.sort()
        return pinners

    @staticmethod
    def _check_owner(owner: Any) -> None:
        if not isinstance(owner, str) or not owner:
            raise PinError((), str(owner), "the owner must be a non-empty str (a request id)")

    def _release(self, block_ids: list[int]) -> None:
        if not block_ids:
            return
        if self.debug:
            self._poison(block_ids)
        self._free.extend(block_ids)
        is_free = self._is_free
        for block_id in block_ids:
            is_free[block_id] = 1

    def _index(self, block_ids: Iterable[int]) -> torch.Tensor:
        return torch.tensor(list(block_ids), dtype=torch.long, device=self.device)

    def _poison(self, block_ids: Iterable[int]) -> None:
        index = self._index(block_ids)
        if index.numel() == 0:
            return
        for layer in self.layers:
            if layer.dtype.is_floating_point:
                layer.index_fill_(0, index, float("nan"))
            else:
                layer.view(torch.uint8).index_fill_(0, index, POISON_BLOCK_BYTE)

    def _unpoisoned(self, block_ids: list[int]) -> list[int]:
        """The blocks among ``block_ids`` whose poison is gone in any layer."""
        if not block_ids:
            return []
        index = self._index(block_ids)
        intact = torch.ones(len(block_ids), dtype=torch.bool, device=self.device)
        for layer in self.layers:
            rows = layer.index_select(0, index)
            if layer.dtype.is_floating_point:
                ok = torch.isnan(rows.float()).flatten(1).all(dim=1)
            else:
                ok = (rows.view(torch.uint8) == POISON_BLOCK_BYTE).flatten(1).all(dim=1)
            intact &= ok
        return [b for b, ok in zip(block_ids, intact.tolist(), strict=True) if not ok]

    def _log(self, block_ids: list[int], owner: str, phase: str) -> None:
        if self._logger is not None:
            self._logger.info(
                "pool.deferred_free", block_ids=sorted(block_ids), owner=owner, phase=phase
            )

    def __repr__(self) -> str:
        if self.host_owned:
            return (f"BlockPool(num_blocks={self.num_blocks}, host_owned=True, "
                    f"pinned={self.num_pinned}, dtype={self.dtype}, device={self.device})")
        return (
            f"BlockPool(num_blocks={self.num_blocks}, free={self.num_free}, "
            f"allocated={self.num_allocated}, deferred={self.num_deferred}, "
            f"pinned={self.num_pinned}, dtype={self.dtype}, device={self.device})"
        )
