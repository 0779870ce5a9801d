"""One rank's host: the loop that a serving process runs around its ``TransferEngine``.

A prefill host writes each request's KV shard into its pool, sends it to its decode peer and
frees the blocks right after ``send()`` (the pool defers the free until the transfer is
quiescent); every layer-wise request is written layer by layer, ``layer_ready`` after each.
A decode host allocates, receives, regenerates the expected bytes and compares every block
byte for byte, then frees. The pools run in debug mode: a block written after its free shows
as ``PoisonError`` when it is allocated again (this rank stops there) or at
``assert_poisoned`` when the books are read. ``RankHost.summary`` is those books.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from kvhandoff.demo._plan import TP, Plan, Request

if TYPE_CHECKING:
    import torch
    from kvhandoff.engine import BlockPool, TransferEngine

OK = "ok"
CORRUPT = "corrupt"  # the received bytes differ from what prefill wrote
POISONED = "poisoned_block"  # a block was written after its free: this rank stopped here


@attrs.frozen
class RankSummary:
    """What one rank saw; picklable, gathered to rank 0 under MPI."""

    rank: int
    role: str
    outcomes: dict[int, str]  # request index -> OK, CORRUPT or a failure reason
    latencies: tuple[float, ...]  # decode: seconds from receive() to its result
    bytes_verified: int
    mismatched_blocks: int
    healthy: bool
    health_reason: str | None
    restart_requested: bool
    quarantines: int
    leaked_blocks: int
    early_freed_blocks: int
    pool_problems: tuple[str, ...]
    drain_left: int
    faults_injected: dict[str, int]
    #: Seconds this rank's host spent writing KV (prefill) or verifying it (decode): work
    #: that blocks its event loop and is kept out of the timed transfers.
    host_seconds: float = 0.0


class RankHost:
    """One rank's host: allocates, writes or verifies KV, and drives its engine.

    Ranks below ``TP`` are prefill, the others decode; prefill rank ``r`` sends to ``r + TP``.
    ``on_done(index)`` is called when this rank has finished request ``index``, whatever its
    outcome (the progress bar).
    """

    def __init__(self, plan: Plan, rank: int, pool: BlockPool, engine: TransferEngine,
                 on_done: Callable[[int], None]) -> None:
        import torch

        self.torch = torch
        self.plan = plan
        self.rank = rank
        self.tp_rank = rank % TP
        self.prefill = rank < TP
        self.peer = rank + TP if self.prefill else rank - TP
        self.pool = pool
        self.engine = engine
        self.on_done = on_done
        self.outcomes: dict[int, str] = {}
        self.latencies: list[float] = []
        self.bytes_verified = 0
        self.host_seconds = 0.0
        self.mismatched_blocks = 0
        self.early_freed: set[int] = set()
        self._scratch: dict[str, torch.Tensor] = {}

    def kv_bytes(self, request: Request, scratch: str | None = None) -> torch.Tensor:
        """The request's KV shard on this TP rank, tensor-major as ``cuda_ext.gather`` packs
        it. Each 16 KiB tensor block is a random tile plus a random per-block offset, so a
        block in the wrong place or a stale byte shows, at a fraction of the cost of drawing
        every byte. With ``scratch`` the bytes go to this rank's reusable buffer of that name
        (valid until the next call with that name: use it before the next ``await``)."""
        torch = self.torch
        plan = self.plan
        words = plan.tensor_block_nbytes // 8
        generator = torch.Generator().manual_seed(
            (plan.seed * 1_000_003 + request.index) * 16 + self.tp_rank)
        tile = torch.empty(words, dtype=torch.int64).random_(generator=generator)
        offsets = torch.empty((2 * plan.layers, request.blocks, 1),
                              dtype=torch.int64).random_(generator=generator)
        shape = (2 * plan.layers, request.blocks, words)
        if scratch is None:
            out = torch.empty(shape, dtype=torch.int64)
        else:
            nbytes = request.blocks * plan.block_nbytes
            out = self.scratch(scratch, nbytes).view(torch.int64).view(shape)
        torch.add(offsets, tile, out=out)
        return out.view(torch.uint8).view(-1)

    def scratch(self, name: str, nbytes: int) -> torch.Tensor:
        """A reusable uint8 buffer of ``nbytes``: fresh buffers of tens of MiB per request
        cost page faults that dominate a run on a busy machine."""
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < nbytes:
            buf = self._scratch[name] = self.torch.empty(
                max(nbytes, self.plan.num_blocks * self.plan.block_nbytes // 4),
                dtype=self.torch.uint8)
        return buf[:nbytes]

    async def alloc(self, request: Request) -> list[int]:
        """Blocks for ``request``, waiting while the pool is short (blocks come back as
        earlier transfers go quiescent)."""
        import anyio
        from kvhandoff.engine import OutOfBlocksError, PoisonError

        while True:
            try:
                return self.pool.alloc(request.blocks, owner=request.request_id)
            except OutOfBlocksError:
                await anyio.sleep(0.002)
            except PoisonError as error:  # a transfer wrote a block after its free
                self.early_freed.update(error.block_ids)
                raise

    async def run(self) -> None:
        """Walk the plan, at most ``concurrency`` requests at a time. Blocks are allocated
        here, in request order, on every rank: were they taken in whatever order the tasks
        got to them, TP rank 0 could hold request k's blocks while rank 1 holds k+1's, each
        waiting for blocks the other's unfinished request keeps pinned (a deadlock)."""
        import anyio
        from kvhandoff.engine import PoisonError

        slots = anyio.Semaphore(self.plan.concurrency)
        async with anyio.create_task_group() as group:
            for request in self.plan.requests:
                await slots.acquire()
                try:
                    ids = await self.alloc(request)
                except PoisonError:
                    # The poisoned blocks head the free list, so every later alloc would
                    # fail too: this rank stops (its peers' transfers end by timeout) and
                    # the report counts the blocks as freed early.
                    slots.release()
                    self.outcomes[request.index] = POISONED
                    break
                group.start_soon(self._one, request, ids, slots)

    async def _one(self, request: Request, ids: list[int], slots: Any) -> None:
        from kvhandoff.engine import TransferError

        try:
            work = self._send if self.prefill else self._receive
            outcome = await work(request, ids)
        except TransferError as error:
            outcome = error.reason
        finally:
            slots.release()
        self.outcomes[request.index] = outcome
        self.on_done(request.index)

    async def _send(self, request: Request, ids: list[int]) -> str:
        import anyio.lowlevel
        from kvhandoff import cuda_ext

        rid = request.request_id
        layers = self.pool.layers
        if not request.layerwise:
            begin = time.perf_counter()
            data = self.kv_bytes(request, scratch="kv")
            cuda_ext.scatter(data, layers, ids)
            self.host_seconds += time.perf_counter() - begin
            handle = self.engine.send(rid, ids, self.peer)
            self.pool.free(ids, owner=rid)  # deferred until the transfer is quiescent
        else:  # the layers are written across awaits: this request's own buffer
            begin = time.perf_counter()
            data = self.kv_bytes(request)
            self.host_seconds += time.perf_counter() - begin
            handle = self.engine.send(rid, ids, self.peer, layerwise=True)
            per_layer = 2 * len(ids) * self.plan.tensor_block_nbytes
            for layer in range(self.plan.layers):  # prefill produces one layer at a time
                begin = time.perf_counter()
                cuda_ext.scatter(data[layer * per_layer:(layer + 1) * per_layer],
                                 layers[2 * layer:2 * layer + 2], ids)
                self.host_seconds += time.perf_counter() - begin
                handle.layer_ready(layer)
                await anyio.lowlevel.checkpoint()
            self.pool.free(ids, owner=rid)
        await handle.wait()
        return OK

    async def _receive(self, request: Request, ids: list[int]) -> str:
        from kvhandoff import cuda_ext

        rid = request.request_id
        start = time.perf_counter()
        try:
            handle = self.engine.receive(rid, ids, self.peer, layerwise=request.layerwise)
            result = await handle.wait()
            seconds = time.perf_counter() - start
            # Verification, outside the timed transfer (it blocks this rank's loop).
            got = self.scratch("got", result.nbytes)
            cuda_ext.gather(self.pool.layers, ids, got)
            want = self.kv_bytes(request, scratch="kv")
            bad = 0
            if not self.torch.equal(got, want):  # count the blocks only when some differ
                shape = (2 * self.plan.layers, len(ids), -1)
                bad = int((got.view(shape) != want.view(shape)).any(dim=2).any(dim=0).sum())
            self.host_seconds += time.perf_counter() - start - seconds
        finally:
            self.pool.free(ids, owner=rid)
        if bad:
            self.mismatched_blocks += bad
            return CORRUPT
        self.latencies.append(seconds)
        self.bytes_verified += result.nbytes
        return OK

    def summary(self, drain_left: int) -> RankSummary:
        """The books, read after the engine has exited (every transfer released)."""
        from kvhandoff.engine import PoisonError, PoolInvariantError

        problems: list[str] = []
        try:
            self.pool.check()
        except PoolInvariantError as error:
            problems.extend(error.problems)
        early = set(self.early_freed)
        try:
            self.pool.assert_poisoned()
        except PoisonError as error:
            early.update(error.block_ids)
        health = self.engine.health()
        stats = self.engine.stats()
        injected = getattr(self.engine.transport, "injected", {})
        return RankSummary(
            rank=self.rank, role="prefill" if self.prefill else "decode",
            outcomes=dict(self.outcomes), latencies=tuple(self.latencies),
            bytes_verified=self.bytes_verified, mismatched_blocks=self.mismatched_blocks,
            healthy=health.healthy, health_reason=health.reason,
            restart_requested=self.engine.restart_requested, quarantines=stats.quarantines,
            leaked_blocks=self.pool.num_blocks - self.pool.num_free,
            early_freed_blocks=len(early), pool_problems=tuple(problems),
            drain_left=drain_left,
            faults_injected={fault.value: n for fault, n in injected.items()
                             if n and fault.value != "none"},
            host_seconds=self.host_seconds,
        )
