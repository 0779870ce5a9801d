"""Shared pieces of the engine tests (no tests here): pools with known contents, a held
transport whose chosen operations finish only when the test says so, a recording transport,
a manual clock that waits for the engines it drives, waits on conditions and on engine ticks
(never a bare sleep), a context that runs a set of engines and drains them together, and
``engine_pair``: the two-rank set-up most tests share."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import anyio
import attrs
import pytest
import torch
from kvhandoff.engine import BlockPool, EngineConfig, TransferEngine
from kvhandoff.engine.transports import (
    HandleKind,
    HandleState,
    Transport,
    TransportHandle,
    WrappingTransport,
    loopback_group,
)

NUM_LAYERS = 2


def make_pool(num_blocks: int = 32, num_layers: int = NUM_LAYERS) -> BlockPool:
    """A small debug pool: freed blocks are poisoned, so a late write is caught on alloc."""
    return BlockPool(num_blocks, num_layers, 4, 2, 8, dtype=torch.float32, debug=True)


def fill(pool: BlockPool, block_ids: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Write a known pattern into ``block_ids`` of every layer; returns the expected KV."""
    gen = torch.Generator().manual_seed(seed)
    for layer in pool.layers:
        layer[list(block_ids)] = torch.randn(layer[list(block_ids)].shape,
                                             generator=gen).to(layer.dtype)
    return [layer[list(block_ids)].clone() for layer in pool.layers]


def kv_of(pool: BlockPool, block_ids: Sequence[int]) -> list[torch.Tensor]:
    return [layer[list(block_ids)].clone() for layer in pool.layers]


def same_kv(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def token_slots(pool: BlockPool, block_ids: Sequence[int],
                num_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The bytes of ``block_ids`` in every layer tensor split at ``num_tokens``: (the valid
    token slots: every slot of the blocks before the last, then the last block's first
    ``valid``; the last block's slots past the count), each a uint8 copy per layer tensor,
    for either block order (``pool.layout.order``). Compared as bytes, so NaN poison
    compares equal to itself."""
    ids = list(block_ids)
    valid = num_tokens - (len(ids) - 1) * pool.block_tokens
    assert 0 < valid <= pool.block_tokens
    head_major = pool.layout.order == "HND"
    kept: list[torch.Tensor] = []
    past: list[torch.Tensor] = []
    for layer in pool.layers:
        last = layer[ids[-1]]
        tail, rest = (last[:, :valid], last[:, valid:]) if head_major else \
            (last[:valid], last[valid:])
        kept.append(torch.cat([layer[ids[:-1]].reshape(-1).view(torch.uint8),
                               tail.contiguous().reshape(-1).view(torch.uint8)]))
        past.append(rest.contiguous().reshape(-1).view(torch.uint8))
    return kept, past


class ManualClock:
    """An injectable clock the test advances by hand (deadlines, leases, health). It learns
    the engines it drives from ``running(..., clock=clock)`` (or ``engine_pair``), so that
    ``advance`` can wait for them to see each step."""

    def __init__(self, start: float = 1000.0, ticks_per_step: int = 2) -> None:
        self.now = start
        self.ticks_per_step = ticks_per_step
        self.engines: list[TransferEngine] = []
        self._real_since: float | None = None

    def __call__(self) -> float:
        if self._real_since is not None:  # after the test body: time flows again
            return self.now + time.monotonic() - self._real_since
        return self.now

    def drive(self, *engines: TransferEngine) -> None:
        """Make ``advance`` wait for ``engines`` too."""
        self.engines.extend(engines)

    def run_free(self) -> None:
        """Let time flow from now on, so an engine's drain deadline (on this clock) passes
        even when the test body stopped early."""
        if self._real_since is None:
            self._real_since = time.monotonic()

    async def advance(self, seconds: float, steps: int = 10) -> None:
        """Move time forward in ``steps`` increments; after each, wait until every engine
        this clock drives ticked ``ticks_per_step`` more times (each tick reads the clock
        first, so every engine acted on every step), bounded in real time."""
        if not self.engines:
            raise RuntimeError("ManualClock.advance drives no engine: enter the engines with "
                               "running(..., clock=clock) or engine_pair(clock=clock)")
        for _ in range(steps):
            self.now += seconds / steps
            await ticks(*self.engines, n=self.ticks_per_step)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (real time, bounded) until ``predicate()`` holds; fails the test otherwise."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.001)  # a poll of the condition, not a guess at a duration


async def free_once_released(p0: BlockPool, p1: BlockPool, rid: str,
                             src: Sequence[int], dst: Sequence[int]) -> None:
    """The host's end of a test transfer: wait until neither side pins ``rid``'s blocks,
    then free ``src`` on ``p0`` and ``dst`` on ``p1``."""
    await until(lambda: not p0.pinned_by(rid) and not p1.pinned_by(rid))
    p0.free(src, owner=rid)
    p1.free(dst, owner=rid)


async def ticks(*engines: TransferEngine, n: int = 20, timeout: float = 5.0) -> None:
    """Wait (real time, bounded) until each engine's loop ran ``n`` more ticks: for "this
    still has not happened" checks, so the engines had ``n`` chances to do the wrong thing
    however slow the machine is."""
    targets = [(engine, engine.stats().ticks + n) for engine in engines]
    await until(lambda: all(engine.stats().ticks >= target for engine, target in targets),
                timeout=timeout)


class _HeldHandle(TransportHandle):
    def __init__(self, owner: HeldTransport, inner: TransportHandle, index: int) -> None:
        super().__init__(inner.kind, inner.peer, inner.tag, inner.nbytes, owner._ready.append)
        self.inner = inner
        self.index = index
        self._owner = owner

    def _progress(self) -> None:
        if self.index in self._owner.held:
            return
        if self.inner.test() is not HandleState.PENDING:
            self._finish(self.inner.state, self.inner.error)

    def cancel(self) -> bool:
        # A held operation cannot be cancelled: like an MPI send, it runs to its own end.
        if self.index in self._owner.held or not self._owner.cancellable_kinds:
            return False
        return self.inner.cancel()


class HeldTransport(WrappingTransport):
    """Wraps ``inner``; the operations whose post index is in ``held`` do not finish (and
    cannot be cancelled) until ``release(index)``: a wedged link the test un-wedges. Other
    operations can be cancelled (through ``inner``) only when ``cancellable``. Records every
    post as ``(kind, tag, nbytes)`` in ``posts``."""

    def __init__(self, inner: Transport, held: Sequence[int] = (),
                 cancellable: bool = False) -> None:
        super().__init__(inner, frozenset(HandleKind) if cancellable else frozenset())
        self.held: set[int] = set(held)
        self.posts: list[tuple[str, int, int]] = []

    def release(self, index: int) -> None:
        self.held.discard(index)

    def post_send(self, buf: torch.Tensor, peer: int, tag: int) -> TransportHandle:
        return self._wrap(self.inner.post_send(buf, peer, tag))

    def post_recv(self, buf: torch.Tensor, peer: int, tag: int) -> TransportHandle:
        return self._wrap(self.inner.post_recv(buf, peer, tag))

    def _wrap(self, inner: TransportHandle) -> TransportHandle:
        handle = _HeldHandle(self, inner, len(self.posts))
        self.posts.append((inner.kind.value, inner.tag, inner.nbytes))
        return self._track(handle)


def fast_config(**overrides: float | int | None) -> EngineConfig:
    values: dict[str, float | int | None] = dict(
        queue_timeout_s=2.0, transfer_timeout_s=2.0, lease_s=5.0, drain_timeout_s=2.0,
        agreement_timeout_s=5.0,
    )
    values.update(overrides)
    return EngineConfig(**values)  # type: ignore[arg-type]


async def drain_all(engines: Sequence[TransferEngine], timeout: float = 2.0) -> list[object]:
    """Drain every engine at once: a TP group's drain needs every rank draining together."""
    reports: list[object] = [None] * len(engines)

    async def one(i: int) -> None:
        reports[i] = await engines[i].drain(timeout)

    async with anyio.create_task_group() as tg:
        for i in range(len(engines)):
            tg.start_soon(one, i)
    return reports


@contextlib.asynccontextmanager
async def running(*engines: TransferEngine,
                  clock: ManualClock | None = None) -> AsyncIterator[tuple[TransferEngine, ...]]:
    """Enter every engine, and on the way out drain them together before exiting. A manual
    ``clock`` drives these engines (``advance`` waits for them), and time flows again on the
    way out so the drains are bounded."""
    async with contextlib.AsyncExitStack() as stack:
        if clock is not None:
            clock.drive(*engines)
            stack.callback(clock.run_free)
        for engine in engines:
            await stack.enter_async_context(engine)
        yield engines
        if clock is not None:
            clock.run_free()
        await drain_all(engines)


@attrs.define
class EnginePair:
    """Two running engines on one loopback link: rank 0 (``e0`` over ``t0``, blocks in
    ``p0``) and rank 1. ``t0``/``t1`` are what the engines were given: the test's wrapper
    (``HeldTransport``, ``FaultyTransport``) when it asked for one, else the loopback."""

    e0: TransferEngine
    e1: TransferEngine
    p0: BlockPool
    p1: BlockPool
    t0: Any  # Any: the wrapper's own calls (release, posts, lose_peer) are what tests use
    t1: Any


@contextlib.asynccontextmanager
async def engine_pair(
    config: EngineConfig | None = None,
    clock: ManualClock | None = None,
    wrap0: Callable[[Transport], Transport] | None = None,
    wrap1: Callable[[Transport], Transport] | None = None,
    *,
    num_blocks: int = 32,
    num_layers: int = NUM_LAYERS,
    kwargs0: Mapping[str, Any] | None = None,
    kwargs1: Mapping[str, Any] | None = None,
    **engine_kwargs: Any,
) -> AsyncIterator[EnginePair]:
    """Run two engines (rank 0 and rank 1 of a loopback group, ``fast_config()`` unless
    ``config`` is given, on ``clock`` when given) over fresh debug pools. ``wrap0``/``wrap1``
    wrap a rank's transport (e.g. ``partial(HeldTransport, held=[0])``); ``engine_kwargs``
    go to both engines, ``kwargs0``/``kwargs1`` to one only (and win). On a clean exit both
    engines drain together, then both pools pass ``check()``."""
    t0, t1 = loopback_group(2)
    if wrap0 is not None:
        t0 = wrap0(t0)
    if wrap1 is not None:
        t1 = wrap1(t1)
    p0, p1 = make_pool(num_blocks, num_layers), make_pool(num_blocks, num_layers)
    shared: dict[str, Any] = dict(config=fast_config() if config is None else config,
                                  **engine_kwargs)
    if clock is not None:
        shared["clock"] = clock
    e0 = TransferEngine(p0, t0, **{**shared, **(kwargs0 or {})})
    e1 = TransferEngine(p1, t1, **{**shared, **(kwargs1 or {})})
    async with running(e0, e1, clock=clock):
        yield EnginePair(e0=e0, e1=e1, p0=p0, p1=p1, t0=t0, t1=t1)
    p0.check()
    p1.check()


@pytest.fixture(params=["asyncio", "trio"])
def both_backends(request: pytest.FixtureRequest) -> str:
    """Use as ``anyio_backend`` (``from engine_support import both_backends as
    anyio_backend``) to run a module's tests under asyncio and trio."""
    return str(request.param)

