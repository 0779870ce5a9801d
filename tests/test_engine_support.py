"""Shared pieces of the engine tests (no tests here): pools with known contents, a held
transport whose chosen operations finish only when the test says so, a recording transport,
a manual clock, and a context that runs a set of engines and drains them together."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence

import anyio
import torch
from kvhandoff.engine import BlockPool, EngineConfig, TransferEngine
from kvhandoff.engine.transports import HandleKind, HandleState, Transport, TransportHandle

NUM_LAYERS = 2


def make_pool(num_blocks: int = 32, num_layers: int = NUM_LAYERS) -> BlockPool:
    """A small debug pool: freed blocks are poisoned, so a late write is caught on alloc."""
    return BlockPool(num_blocks, num_layers, 4, 2, 8, dtype=torch.float32, debug=True)


def fill(pool: BlockPool, block_ids: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Write a known pattern into ``block_ids`` of every layer; returns the expected KV."""
    gen = torch.Generator().manual_seed(seed)
    for layer in pool.layers:
        layer[list(block_ids)] = torch.randn(layer[list(block_ids)].shape, generator=gen)
    return [layer[list(block_ids)].clone() for layer in pool.layers]


def kv_of(pool: BlockPool, block_ids: Sequence[int]) -> list[torch.Tensor]:
    return [layer[list(block_ids)].clone() for layer in pool.layers]


def same_kv(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class ManualClock:
    """An injectable clock the test advances by hand (deadlines, leases, health)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._real_since: float | None = None

    def __call__(self) -> float:
        if self._real_since is not None:  # after the test body: time flows again
            return self.now + time.monotonic() - self._real_since
        return self.now

    def run_free(self) -> None:
        """Let time flow from now on, so an engine's drain deadline (on this clock) passes
        even when the test body stopped early."""
        if self._real_since is None:
            self._real_since = time.monotonic()

    async def advance(self, seconds: float, steps: int = 10) -> None:
        """Move time forward in ``steps`` increments, letting the engines tick in between."""
        for _ in range(steps):
            self.now += seconds / steps
            await anyio.sleep(0.003)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (real time, bounded) until ``predicate()`` holds; fails the test otherwise."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.001)


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


class HeldTransport(Transport):
    """Wraps ``inner``; the operations whose post index is in ``held`` do not finish (and
    cannot be cancelled) until ``release(index)``: a wedged link the test un-wedges. Other
    operations can be cancelled (through ``inner``) only when ``cancellable``. Records every
    post as ``(kind, tag, nbytes)`` in ``posts``."""

    def __init__(self, inner: Transport, held: Sequence[int] = (),
                 cancellable: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.rank = inner.rank
        self.world_size = inner.world_size
        self.max_tag = inner.max_tag
        self.cancellable_kinds = frozenset(HandleKind) if cancellable else frozenset()
        self.held: set[int] = set(held)
        self.posts: list[tuple[str, int, int]] = []
        self._live: list[_HeldHandle] = []

    def release(self, index: int) -> None:
        self.held.discard(index)

    def post_send(self, buf: torch.Tensor, peer: int, tag: int) -> TransportHandle:
        return self._wrap(self.inner.post_send(buf, peer, tag))

    def post_recv(self, buf: torch.Tensor, peer: int, tag: int) -> TransportHandle:
        return self._wrap(self.inner.post_recv(buf, peer, tag))

    def _wrap(self, inner: TransportHandle) -> TransportHandle:
        handle = _HeldHandle(self, inner, len(self.posts))
        self.posts.append((inner.kind.value, inner.tag, inner.nbytes))
        self._live.append(handle)
        return handle

    def _advance(self) -> None:
        self.inner.poll()
        still = []
        for handle in self._live:
            handle._progress()
            if not handle.final:
                still.append(handle)
        self._live = still

    def send_control(self, peer: int, payload: bytes) -> None:
        self.inner.send_control(peer, payload)

    def recv_control(self) -> list[tuple[int, bytes]]:
        return self.inner.recv_control()

    def close(self) -> None:
        if self._begin_close():
            self.inner.close()


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
    """Enter every engine, and on the way out drain them together before exiting. With a
    manual ``clock``, time flows again on the way out so the drains are bounded."""
    async with contextlib.AsyncExitStack() as stack:
        if clock is not None:
            stack.callback(clock.run_free)
        for engine in engines:
            await stack.enter_async_context(engine)
        yield engines
        if clock is not None:
            clock.run_free()
        await drain_all(engines)
