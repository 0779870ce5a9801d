"""``kvhandoff demo``: a simulated disaggregated serving run over the real transfer engine.

Four ranks: ranks 0 and 1 are the prefill TP group, ranks 2 and 3 the decode TP group (TP=2
each), and prefill rank ``r`` sends its shard of every request's KV to decode rank ``r + 2``.
By default all four ranks are ``TransferEngine`` instances in this process, in one anyio event
loop, over the loopback transport and in-process TP groups; ``--backend mpi`` runs one rank per
process under ``mpiexec -n 4`` (MPITransport over COMM_WORLD, TP groups split from it).

Every rank walks the same request list (deterministic from ``--seed``), at most
``--concurrency`` requests at a time. Prefill writes each request's KV shard (bytes drawn
from a generator seeded by seed, request and TP rank), sends it and frees its blocks right
after ``send()`` (the pool defers the free until the transfer is quiescent); every
``--layerwise-every``-th request is sent layer by layer as prefill "produces" the layers.
Decode allocates, receives, regenerates the expected bytes and compares every block byte for
byte, then frees.

The pools run in debug mode: a freed block is poisoned, so a block that a transfer touched
after its free is caught (``PoisonError`` when it is allocated again, or ``assert_poisoned``
at the end). Exit code 0 only when no block leaked, none was written after its free, every
received block matched and, without ``--faults``, every request succeeded. With ``--faults``
each transport is wrapped in a seeded ``FaultyTransport`` (errors, stuck operations that end
by cancel, delays): failed requests are expected and reported by reason, the books must
still balance. (Under ``--backend mpi`` a layer-wise transfer failed half-way can leave the
sender's already-posted layer sends pending for good, as MPI cannot cancel a send; the demo
reports those blocks as leaked and exits 1.) Bad options exit with code 2.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import random
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import torch
    from kvhandoff.engine import TransferEngine
    from kvhandoff.engine.pool import BlockPool

WORLD = 4  # two prefill ranks, then two decode ranks
TP = 2
OK = "ok"
CORRUPT = "corrupt"  # the received bytes differ from what prefill wrote
POISONED = "poisoned_block"  # a block was written after its free: this rank stopped here


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("embedded", "mpi"), default="embedded",
                        help="embedded: 4 in-process ranks over loopback (default); mpi: one "
                             "rank per process, run under `mpiexec -n 4`")
    parser.add_argument("--requests", type=int, default=8, metavar="N",
                        help="requests to move (default: 8)")
    parser.add_argument("--concurrency", type=int, default=4, metavar="N",
                        help="requests in flight at a time on each rank (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of requests, KV and faults")
    parser.add_argument("--blocks", type=int, default=192, metavar="N",
                        help="KV blocks per rank's pool (default: 192, i.e. 192 MiB with the "
                             "default shape); at least one request's worth")
    parser.add_argument("--layers", type=int, default=32, help="model layers (default: 32)")
    parser.add_argument("--kv-heads", type=int, default=8,
                        help="KV heads of the model, split over TP=2 (default: 8)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim (default: 128)")
    parser.add_argument("--block-tokens", type=int, default=16,
                        help="tokens per KV block (default: 16)")
    parser.add_argument("--min-tokens", type=int, default=128,
                        help="shortest prompt (default: 128)")
    parser.add_argument("--max-tokens", type=int, default=2048,
                        help="longest prompt (default: 2048)")
    parser.add_argument("--layerwise-every", type=int, default=4, metavar="K",
                        help="send every K-th request layer by layer; 0: never (default: 4)")
    parser.add_argument("--faults", action="store_true",
                        help="inject transport faults (seeded errors, stuck operations, "
                             "delays); failures are reported, leaks must still be 0")
    parser.add_argument("--log-dir", metavar="DIR",
                        help="write per-rank logs rank-<N>.jsonl here (for `kvhandoff analyze`)")
    parser.add_argument("--torch-threads", type=int, default=1, metavar="N",
                        help="torch intra-op threads per process (default: 1: the ranks' copies "
                             "are small and the ranks share the cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# --- the plan ------------------------------------------------------------------------------


@attrs.frozen
class Request:
    """One request of the plan: ``blocks`` KV blocks on every rank, sent layer-wise or not."""

    index: int
    request_id: str
    tokens: int
    blocks: int
    layerwise: bool


@attrs.frozen
class Plan:
    """Everything every rank must agree on, derived from the command line alone."""

    requests: tuple[Request, ...]
    concurrency: int
    seed: int
    num_blocks: int
    layers: int
    kv_heads: int  # per rank (the TP shard)
    head_dim: int
    block_tokens: int
    faults: bool

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block across every layer, K and V."""
        return 2 * self.layers * self.tensor_block_nbytes

    @property
    def tensor_block_nbytes(self) -> int:
        """Bytes of one block of one K or V tensor (bf16)."""
        return self.block_tokens * self.kv_heads * self.head_dim * 2


def make_plan(args: argparse.Namespace) -> Plan:
    """The request list and geometry; ``ValueError`` naming the option when one is bad."""
    positive = ("requests", "concurrency", "blocks", "layers", "kv_heads", "head_dim",
                "block_tokens", "min_tokens", "max_tokens", "torch_threads")
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.kv_heads % TP:
        raise ValueError(f"--kv-heads must be divisible by the TP size {TP}")
    if args.min_tokens > args.max_tokens:
        raise ValueError("--min-tokens must not exceed --max-tokens")
    if args.layerwise_every < 0:
        raise ValueError("--layerwise-every must be 0 (never) or more")
    most = math.ceil(args.max_tokens / args.block_tokens)
    if args.blocks < most:
        raise ValueError(f"--blocks must be at least {most} (one {args.max_tokens}-token "
                         f"request at {args.block_tokens} tokens per block)")
    rng = random.Random(args.seed)
    requests = []
    for index in range(args.requests):
        tokens = rng.randint(args.min_tokens, args.max_tokens)
        layerwise = args.layerwise_every > 0 and index % args.layerwise_every == \
            args.layerwise_every - 1
        requests.append(Request(index, f"req-{args.seed}-{index}", tokens,
                                math.ceil(tokens / args.block_tokens), layerwise))
    return Plan(tuple(requests), args.concurrency, args.seed, args.blocks, args.layers,
                args.kv_heads // TP, args.head_dim, args.block_tokens, args.faults)


def _engine_config(plan: Plan) -> Any:
    from kvhandoff.engine import EngineConfig

    if plan.faults:  # stuck operations end at the transfer deadline: keep it short
        return EngineConfig(queue_timeout_s=10.0, transfer_timeout_s=2.0, lease_s=10.0,
                            drain_timeout_s=20.0)
    return EngineConfig(queue_timeout_s=60.0, transfer_timeout_s=60.0, drain_timeout_s=20.0)


def _wrap_faulty(transport: Any, plan: Plan, rank: int) -> Any:
    if not plan.faults:
        return transport
    from kvhandoff.engine.transports import FaultyTransport

    return FaultyTransport(transport, seed=plan.seed * 1009 + rank, error_rate=0.03,
                           stuck_rate=0.03, delay_rate=0.25, delay_s=0.005)


# --- one rank ------------------------------------------------------------------------------


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


class _Rank:
    """One rank's host: allocates, writes or verifies KV, and drives its engine."""

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
        from kvhandoff.engine.errors import OutOfBlocksError, PoisonError

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
        from kvhandoff.engine.errors import PoisonError

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
        from kvhandoff.engine.errors import TransferError

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
            data = self.kv_bytes(request, scratch="kv")
            cuda_ext.scatter(data, layers, ids)
            handle = self.engine.send(rid, ids, self.peer)
            self.pool.free(ids, owner=rid)  # deferred until the transfer is quiescent
        else:  # the layers are written across awaits: this request's own buffer
            data = self.kv_bytes(request)
            handle = self.engine.send(rid, ids, self.peer, layerwise=True)
            per_layer = 2 * len(ids) * self.plan.tensor_block_nbytes
            for layer in range(self.plan.layers):  # prefill produces one layer at a time
                cuda_ext.scatter(data[layer * per_layer:(layer + 1) * per_layer],
                                 layers[2 * layer:2 * layer + 2], ids)
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
            got = self.scratch("got", result.nbytes)
            cuda_ext.gather(self.pool.layers, ids, got)
            want = self.kv_bytes(request, scratch="kv")
            bad = 0
            if not self.torch.equal(got, want):  # count the blocks only when some differ
                shape = (2 * self.plan.layers, len(ids), -1)
                bad = int((got.view(shape) != want.view(shape)).any(dim=2).any(dim=0).sum())
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
        from kvhandoff.engine.errors import PoisonError, PoolInvariantError

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
        )


def _make_pool(plan: Plan) -> BlockPool:
    import torch
    from kvhandoff.engine.pool import BlockPool

    return BlockPool(plan.num_blocks, plan.layers, plan.block_tokens, plan.kv_heads,
                     plan.head_dim, dtype=torch.bfloat16, debug=True)


async def _drive(ranks: Sequence[_Rank]) -> tuple[list[RankSummary], float]:
    """Run the ranks' request loops, drain every engine, and read the books."""
    import anyio

    start = time.perf_counter()
    async with anyio.create_task_group() as group:
        for rank in ranks:
            group.start_soon(rank.run)
    seconds = time.perf_counter() - start
    left: dict[int, int] = {}

    async def drain(rank: _Rank) -> None:
        report = await rank.engine.drain(rank.engine.config.drain_timeout_s)
        left[rank.rank] = len(report.left)

    async with anyio.create_task_group() as group:  # every TP rank drains at once
        for rank in ranks:
            group.start_soon(drain, rank)
    return [rank.summary(left[rank.rank]) for rank in ranks], seconds


# --- the two backends ----------------------------------------------------------------------


class _Progress:
    """A rich progress bar over requests finished on every rank of this process."""

    def __init__(self, total: int, local_ranks: int, enabled: bool) -> None:
        self._need = local_ranks
        self._seen: collections.Counter[int] = collections.Counter()
        self._bar: Any = None
        self._task: Any = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress("[progress.description]{task.description}", BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), transient=True)
            self._task = self._bar.add_task("requests", total=total)

    def done(self, index: int) -> None:
        self._seen[index] += 1
        if self._seen[index] == self._need and self._bar is not None:
            self._bar.advance(self._task)

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._bar is not None:
            self._bar.stop()


def _run_embedded(plan: Plan, progress: bool) -> tuple[list[RankSummary], float]:
    import anyio
    from kvhandoff.collectives import local_group
    from kvhandoff.engine import TransferEngine
    from kvhandoff.engine.transports import loopback_group

    async def main() -> tuple[list[RankSummary], float]:
        transports = [_wrap_faulty(t, plan, r) for r, t in enumerate(loopback_group(WORLD))]
        comms = [*local_group(TP, name="prefill-tp"),
                 *local_group(TP, name="decode-tp", first_log_rank=TP)]
        config = _engine_config(plan)
        with _Progress(len(plan.requests), WORLD, progress) as bar:
            async with contextlib.AsyncExitStack() as stack:
                ranks = []
                for r in range(WORLD):
                    pool = _make_pool(plan)
                    engine = TransferEngine(pool, transports[r], tp_comm=comms[r],
                                            config=config, layout_extra=(r % TP, TP))
                    await stack.enter_async_context(engine)
                    ranks.append(_Rank(plan, r, pool, engine, bar.done))
                return await _drive(ranks)

    return anyio.run(main)


def _run_mpi(plan: Plan, progress: bool) -> tuple[list[RankSummary], float] | None:
    """This process's rank; returns every rank's summary on rank 0, None elsewhere."""
    import anyio
    from kvhandoff.collectives import CheckedComm
    from kvhandoff.engine import TransferEngine
    from kvhandoff.engine.transports import MPITransport
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    tp_comm = CheckedComm.from_mpi(world.Split(color=rank // TP, key=rank),
                                   name="prefill-tp" if rank < TP else "decode-tp")
    transport = _wrap_faulty(MPITransport(world), plan, rank)
    pool = _make_pool(plan)
    engine = TransferEngine(pool, transport, tp_comm=tp_comm, config=_engine_config(plan),
                            layout_extra=(rank % TP, TP))

    async def main() -> tuple[list[RankSummary], float]:
        with _Progress(len(plan.requests), 1, progress and rank == 0) as bar:
            async with engine:
                return await _drive([_Rank(plan, rank, pool, engine, bar.done)])

    world.Barrier()  # start the clock together
    try:
        summaries, seconds = anyio.run(main)
    except BaseException:
        # The other ranks would wait for this one's summary forever: end the whole job.
        traceback.print_exc()
        sys.stderr.flush()
        world.Abort(1)
        raise
    gathered = world.gather((summaries[0], seconds), root=0)
    transport.close()
    if gathered is None:  # not rank 0
        return None
    return [s for s, _ in gathered], max(t for _, t in gathered)


# --- the report ----------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _request_outcomes(plan: Plan, summaries: Sequence[RankSummary]) -> list[str]:
    """One outcome per request: OK only if every rank succeeded; otherwise the first
    decode rank's failure (what the consumer saw), else the first prefill rank's."""
    ordered = sorted(summaries, key=lambda s: (s.role != "decode", s.rank))
    outcomes = []
    for request in plan.requests:
        seen = [s.outcomes.get(request.index, "not_run") for s in ordered]
        outcomes.append(next((o for o in seen if o != OK), OK))
    return outcomes


def report(plan: Plan, summaries: Sequence[RankSummary], seconds: float, out: Any) -> int:
    """Print the summary tables; return the exit code (0: clean books and, without faults,
    every request delivered; 1 otherwise)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out, width=100)
    outcomes = _request_outcomes(plan, summaries)
    counts = collections.Counter(outcomes)
    latencies = [t for s in summaries for t in s.latencies]
    moved = sum(s.bytes_verified for s in summaries)
    leaked = sum(s.leaked_blocks for s in summaries)
    early = sum(s.early_freed_blocks for s in summaries)
    mismatched = sum(s.mismatched_blocks for s in summaries)
    problems = [f"rank {s.rank}: {p}" for s in summaries for p in s.pool_problems]
    left = sum(s.drain_left for s in summaries)

    table = Table(title=f"kvhandoff demo: {len(plan.requests)} requests, 2 prefill + 2 decode "
                        f"ranks (TP={TP}), {plan.layers} layers x {plan.kv_heads} KV heads/rank "
                        f"x {plan.head_dim} x {plan.block_tokens} tokens, bf16",
                  show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("requests ok", f"{counts[OK]}/{len(plan.requests)}")
    for reason, n in sorted((r, n) for r, n in counts.items() if r != OK):
        table.add_row(f"  failed: {reason}", str(n))
    table.add_row("bytes verified on decode", f"{moved / 2**30:.2f} GiB")
    table.add_row("throughput", f"{moved / seconds / 1e9:.2f} GB/s in {seconds:.1f} s")
    table.add_row("transfer latency p50 / p99",
                  f"{_percentile(latencies, 0.5) * 1e3:.1f} / "
                  f"{_percentile(latencies, 0.99) * 1e3:.1f} ms")
    table.add_row("leaked blocks", str(leaked))
    table.add_row("early-freed blocks", str(early))
    table.add_row("mismatched blocks", str(mismatched))
    table.add_row("sessions left after drain", str(left))
    console.print(table)

    ranks = Table(title="ranks")
    for column in ("rank", "role", "health", "restart", "quarantines", "leaked",
                   "early-freed", "faults injected"):
        ranks.add_column(column)
    for s in sorted(summaries, key=lambda s: s.rank):
        health = "healthy" if s.healthy else f"UNHEALTHY ({s.health_reason})"
        faults = ", ".join(f"{k}={v}" for k, v in sorted(s.faults_injected.items())) or "-"
        ranks.add_row(str(s.rank), s.role, health, "yes" if s.restart_requested else "no",
                      str(s.quarantines), str(s.leaked_blocks), str(s.early_freed_blocks),
                      faults)
    console.print(ranks)
    for problem in problems:
        console.print(f"pool check failed: {problem}")

    failed_requests = len(outcomes) - counts[OK]
    clean = not (leaked or early or mismatched or problems or left)
    if clean and (plan.faults or not failed_requests):
        console.print("OK: no block leaked or freed early; every delivered block matched byte "
                      "for byte")
        return 0
    console.print("FAILED: " + ", ".join(
        what for what, bad in (("blocks leaked", leaked), ("blocks freed early", early),
                               ("blocks corrupted", mismatched), ("pool books broken", problems),
                               ("sessions left after drain", left),
                               ("requests failed without faults",
                                failed_requests and not plan.faults)) if bad))
    return 1


def run(args: argparse.Namespace) -> int:
    try:
        plan = make_plan(args)
    except ValueError as error:
        print(f"kvhandoff demo: {error}", file=sys.stderr)
        return 2
    progress = not args.no_progress and sys.stdout.isatty()
    import torch

    # Oversubscribed intra-op threads (4 ranks on few cores) make every small copy spin.
    torch.set_num_threads(args.torch_threads)
    if args.log_dir is not None:
        from kvhandoff.collectives import configure_logging

        configure_logging(args.log_dir)
    if args.backend == "mpi":
        from mpi4py import MPI

        size = MPI.COMM_WORLD.Get_size()
        if size != WORLD:
            if MPI.COMM_WORLD.Get_rank() == 0:
                print(f"kvhandoff demo: --backend mpi needs exactly {WORLD} processes, got "
                      f"{size}; run `mpiexec -n {WORLD} kvhandoff demo --backend mpi`",
                      file=sys.stderr)
            return 2
        result = _run_mpi(plan, progress)
        if result is None:
            return 0
    else:
        result = _run_embedded(plan, progress)
    summaries, seconds = result
    return report(plan, summaries, seconds, sys.stdout)
