"""``kvhandoff demo --model``: a real model's KV cache, moved layer by layer as prefill runs.

Theory of operation
===================

Every rank builds the same small Llama from a config in code (``MODEL``), random-initialised
from ``--seed`` (nothing is downloaded; ``transformers`` is the optional extra ``hf``). The
weights are drawn at a large initializer range: at the default one a random model's greedy
decoding repeats the same two tokens whatever its cache holds, and comparing tokens would
prove nothing.

Ranks 0 and 1 are the prefill TP group, 2 and 3 the decode group; prefill rank ``r`` sends to
``r + 2``. Each rank's pool holds its shard of the model's KV heads (``KVLayout`` with
``tp_rank``/``tp_size``, and the model's identity in ``extra``), so the layout the engine
checks at the handshake is the model's own. For every request:

* prefill: ``send(..., layerwise=True, num_tokens=, metadata=)`` (the prompt's token count:
  its last block is partly filled; the prompt's digest as the metadata), then the model's
  forward runs in a worker thread; a forward hook on each decoder layer writes that layer's
  K/V shard into the blocks (``kvcache.write_layer``) and calls
  ``handle.layer_ready(layer)`` on the event loop, so the engine moves layer ``i`` while
  layer ``i + 1`` computes (seed 003's path: one operation per layer on every rank). The
  bytes the engine had moved when the last layer finished computing are counted: that is the
  overlap, measured, not assumed. (Both prefill ranks run the whole model and each sends its
  own heads: the KV bytes are those of a TP=2 prefill.)
* decode: ``receive(..., layerwise=True, num_tokens=)``; once it completes (the result
  carries the sender's metadata, checked against this rank's prompt), the shard is read back
  (``kvcache.read_cache``) and compared with the reference, decoding in one place: this rank
  runs the prefill itself, unsharded, and its cache's heads of this shard must equal the
  received ones byte for byte (a swapped block order shows here, which token equality alone
  could miss). The two decode ranks then exchange their shards over a host collective group
  of their own (never the engine's TP group, whose rounds it would interleave with), put the
  heads back together into a ``DynamicCache`` and decode greedily; the tokens must equal the
  reference's. The negative control corrupts one block of the received
  cache (its keys, tenfold): the tokens must change, or the comparison proves nothing and
  the run fails.

The exit code is 0 only when every request's KV bytes and tokens matched, every negative
control changed the tokens, and no block leaked and no session outlived the drain.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import sys
import time
import traceback
from typing import IO, TYPE_CHECKING, Any

import attrs
from kvhandoff.demo._plan import TP, WORLD

if TYPE_CHECKING:
    import torch
    from kvhandoff.collectives import CheckedComm
    from kvhandoff.engine import BlockPool, KVLayout, TransferEngine

#: The model, built in code: 4 layers, 8 query heads over 4 KV heads (2 per TP rank).
MODEL: dict[str, Any] = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, vocab_size=256,
    # Large weights: a slightly wrong cache changes the next tokens, not just a logit.
    initializer_range=0.5)
MODEL_NAME = "llama-random"


@attrs.frozen
class ModelRequest:
    """One prompt of the run: ``tokens`` long, its ids drawn from the run's seed."""

    index: int
    request_id: str
    tokens: int


@attrs.frozen
class ModelPlan:
    """What every rank derives from the command line alone."""

    requests: tuple[ModelRequest, ...]
    seed: int
    block_tokens: int
    decode_steps: int
    max_tokens: int

    @property
    def num_blocks(self) -> int:
        """Room for two requests of the longest prompt (one in flight, one deferred free)."""
        return 2 * math.ceil(self.max_tokens / self.block_tokens)


@attrs.frozen
class ModelRankSummary:
    """What one rank saw; picklable, gathered to rank 0 under MPI."""

    rank: int
    role: str
    outcomes: dict[int, str]  # request index -> "ok" or what went wrong
    kv_bytes_compared: int
    #: Prefill: bytes the engine had sent when the last layer finished computing (moved
    #: while later layers computed: the overlap, measured).
    bytes_during_forward: int
    bytes_sent: int
    leaked_blocks: int
    drain_left: int


def make_model_plan(args: argparse.Namespace) -> ModelPlan:
    """The prompts; ``ValueError`` naming the option when one cannot make a run."""
    for name in ("requests", "block_tokens", "min_tokens", "max_tokens", "decode_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.min_tokens > args.max_tokens:
        raise ValueError("--min-tokens must not exceed --max-tokens")
    if args.max_tokens + args.decode_steps > 8192:
        raise ValueError("--max-tokens plus --decode-steps must be at most 8192 with --model")
    rng = random.Random(args.seed)
    requests = tuple(ModelRequest(i, f"model-{args.seed}-{i}",
                                  rng.randint(args.min_tokens, args.max_tokens))
                     for i in range(args.requests))
    return ModelPlan(requests, args.seed, args.block_tokens, args.decode_steps,
                     args.max_tokens)


def _transformers() -> Any:
    from kvhandoff.kvcache import MissingExtraError

    try:
        import transformers
    except ImportError:
        raise MissingExtraError("transformers", "hf") from None
    return transformers


def build_model(plan: ModelPlan) -> Any:
    """The run's model: the same weights on every rank (seeded), in eval mode."""
    import torch

    transformers = _transformers()
    config = transformers.LlamaConfig(**MODEL, max_position_embeddings=plan.max_tokens
                                      + plan.decode_steps)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)
        return transformers.LlamaForCausalLM(config).eval()


def layout_for(model: Any, plan: ModelPlan, tp_rank: int) -> KVLayout:
    """This rank's shard of the model's KV: ``kv_heads / TP`` heads, the model named in
    ``extra`` (a rank with another model fails the handshake naming the field)."""
    import torch
    from kvhandoff.engine import KVLayout

    config = model.config
    return KVLayout(config.num_hidden_layers, plan.block_tokens,
                    config.num_key_value_heads // TP,
                    config.hidden_size // config.num_attention_heads, torch.float32,
                    tp_rank=tp_rank, tp_size=TP, extra=(MODEL_NAME, f"seed={plan.seed}"))


def prompt_digest(prompt: torch.Tensor) -> bytes:
    """The transfer's metadata: the prompt's length and a digest of its token ids, so the
    decode rank can tell that the KV it got is of the prompt it means to continue."""
    import hashlib

    digest = hashlib.blake2b(prompt.numpy().tobytes(), digest_size=16).hexdigest()
    return f"prompt_tokens={prompt.shape[-1]};blake2b={digest}".encode()


def prompt_ids(plan: ModelPlan, request: ModelRequest, vocab: int) -> torch.Tensor:
    import torch

    generator = torch.Generator().manual_seed(plan.seed * 1_000_003 + request.index)
    return torch.randint(0, vocab, (1, request.tokens), generator=generator)


def _step(model: Any, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
    """One forward over ``ids`` with ``cache`` (None: a new one): the next greedy token and
    the cache. Newer ``transformers`` call the argument ``cache``, older ``past_key_values``."""
    import inspect

    import torch

    new_name = "cache" in inspect.signature(model.forward).parameters
    with torch.no_grad():
        out = model(ids, use_cache=True, **{"cache" if new_name else "past_key_values": cache})
    cache = out.cache if new_name else out.past_key_values
    return out.logits[:, -1:].argmax(-1), cache


def prefill(model: Any, prompt: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
    """The first generated token and the cache of the prompt."""
    return _step(model, prompt, cache)


def greedy(model: Any, cache: Any, token: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding on from ``cache`` (which it extends)."""
    tokens = []
    for _ in range(steps):
        token, cache = _step(model, token, cache)
        tokens.append(int(token))
    return tokens


class ModelHost:
    """One rank's host loop for the model demo (module docstring)."""

    def __init__(self, plan: ModelPlan, rank: int, model: Any, pool: BlockPool,
                 engine: TransferEngine, kv_comm: CheckedComm) -> None:
        self.plan = plan
        self.rank = rank
        self.prefill_rank = rank < TP
        self.peer = rank + TP if self.prefill_rank else rank - TP
        self.model = model
        self.pool = pool
        self.engine = engine
        self.kv_comm = kv_comm
        self.outcomes: dict[int, str] = {}
        self.kv_bytes_compared = 0
        self.bytes_during_forward = 0
        self._on_layer: Any = None
        if self.prefill_rank:  # one hook per decoder layer, pointed at the current request
            for index, layer in enumerate(model.model.layers):
                layer.register_forward_hook(self._hook(index))

    def _hook(self, index: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            if self._on_layer is not None:
                self._on_layer(index)
        return hook

    async def run(self) -> None:
        for request in self.plan.requests:
            work = self._send if self.prefill_rank else self._receive
            try:
                self.outcomes[request.index] = await work(request)
            except Exception as error:  # a failed request is reported, not raised
                from kvhandoff.engine import TransferError

                if not isinstance(error, TransferError):
                    raise
                self.outcomes[request.index] = error.reason

    async def _send(self, request: ModelRequest) -> str:
        import anyio
        import anyio.from_thread
        import anyio.to_thread
        from kvhandoff.kvcache import write_layer

        rid = request.request_id
        prompt = prompt_ids(self.plan, request, self.model.config.vocab_size)
        ids = self.pool.alloc(math.ceil(request.tokens / self.plan.block_tokens), owner=rid)
        # Only the prompt's tokens count (the last block is partly filled), and the prompt's
        # digest rides along as the transfer's metadata.
        handle = self.engine.send(rid, ids, self.peer, layerwise=True,
                                  num_tokens=request.tokens, metadata=prompt_digest(prompt))
        cache = _transformers().DynamicCache(config=self.model.config)

        last = self.pool.num_layers - 1
        before = self.engine.stats().bytes_sent

        def ready(index: int) -> None:  # on the event loop
            if index == last:  # what moved while later layers still computed
                self.bytes_during_forward += self.engine.stats().bytes_sent - before
            handle.layer_ready(index)

        def layer_done(index: int) -> None:  # in the worker thread, as layer `index` ends
            layer = cache.layers[index]
            write_layer(self.pool, index, layer.keys, layer.values, ids)  # this rank's heads
            anyio.from_thread.run_sync(ready, index)

        self._on_layer = layer_done
        try:
            await anyio.to_thread.run_sync(prefill, self.model, prompt, cache)
        finally:
            self._on_layer = None
        self.pool.free(ids, owner=rid)  # deferred until the transfer is quiescent
        await handle.wait()
        return "ok"

    async def _receive(self, request: ModelRequest) -> str:
        import anyio
        import torch
        from kvhandoff.kvcache import read_cache

        rid = request.request_id
        ids = self.pool.alloc(math.ceil(request.tokens / self.plan.block_tokens), owner=rid)
        try:
            result = await self.engine.receive(rid, ids, self.peer, layerwise=True,
                                               num_tokens=request.tokens).wait()
            shard = read_cache(self.pool, ids, result.num_tokens)
        finally:
            self.pool.free(ids, owner=rid)
        # The reference: the same prefill, in one place, unsharded.
        prompt = prompt_ids(self.plan, request, self.model.config.vocab_size)
        if result.metadata != prompt_digest(prompt):
            return "metadata_mismatch"
        token, reference = prefill(self.model, prompt)
        layout = self.pool.layout
        h0, h1 = layout.tp_rank * layout.kv_heads, (layout.tp_rank + 1) * layout.kv_heads
        kv_equal = all(
            torch.equal(k, ref.keys[:, h0:h1]) and torch.equal(v, ref.values[:, h0:h1])
            for (k, v), ref in zip(shard, reference.layers, strict=True))
        self.kv_bytes_compared += sum(k.nbytes + v.nbytes for k, v in shard)
        want = greedy(self.model, reference, token, self.plan.decode_steps)
        # Both decode ranks put the heads back together (a host group of their own).
        pending = self.kv_comm.iallgather(shard, tag=f"kv:{rid}")
        while not pending.test():
            await anyio.sleep(0.001)
        shards = pending.result()
        joined = [(torch.cat([s[layer][0] for s in shards], dim=1),
                   torch.cat([s[layer][1] for s in shards], dim=1))
                  for layer in range(layout.num_layers)]
        got = greedy(self.model, self._cache(joined), token, self.plan.decode_steps)
        # The negative control: one block (the second, else the first), its keys scaled
        # tenfold in every layer; a milder change (+1 in one layer) of one block in 2000
        # tokens can leave 8 greedy tokens as they were, proving nothing about the check.
        start = self.plan.block_tokens if request.tokens > self.plan.block_tokens else 0
        corrupted = [(k.clone(), v) for k, v in joined]
        for keys, _ in corrupted:
            keys[:, :, start:start + self.plan.block_tokens] *= 10.0
        control = greedy(self.model, self._cache(corrupted), token, self.plan.decode_steps)
        if not kv_equal:
            return "kv_mismatch"
        if got != want:
            return "token_mismatch"
        if control == want:
            return "control_unchanged"
        return "ok"

    def _cache(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        cache = _transformers().DynamicCache(config=self.model.config)
        for layer, (keys, values) in enumerate(kv):
            cache.update(keys.clone(), values.clone(), layer)
        return cache

    def summary(self, drain_left: int) -> ModelRankSummary:
        return ModelRankSummary(
            rank=self.rank, role="prefill" if self.prefill_rank else "decode",
            outcomes=dict(self.outcomes), kv_bytes_compared=self.kv_bytes_compared,
            bytes_during_forward=self.bytes_during_forward,
            bytes_sent=self.engine.stats().bytes_sent,
            leaked_blocks=self.pool.num_blocks - self.pool.num_free, drain_left=drain_left)


def _engine_config() -> Any:
    from kvhandoff.engine import EngineConfig

    return EngineConfig(queue_timeout_s=120.0, transfer_timeout_s=120.0, drain_timeout_s=20.0,
                        checksum=True)  # as the byte demo: the engine verifies each transfer


def _rank(plan: ModelPlan, rank: int, transport: Any, tp_comm: CheckedComm,
          kv_comm: CheckedComm) -> ModelHost:
    from kvhandoff.engine import BlockPool, TransferEngine

    model = build_model(plan)
    pool = BlockPool.from_layout(layout_for(model, plan, rank % TP), plan.num_blocks,
                                 debug=True)
    # The layout has the TP shard (tp_rank, tp_size): no layout_extra for it.
    engine = TransferEngine(pool, transport, tp_comm=tp_comm, config=_engine_config())
    return ModelHost(plan, rank, model, pool, engine, kv_comm)


async def _drive(hosts: list[ModelHost]) -> tuple[list[ModelRankSummary], float]:
    import anyio

    start = time.perf_counter()
    async with anyio.create_task_group() as group:
        for host in hosts:
            group.start_soon(host.run)
    seconds = time.perf_counter() - start
    left: dict[int, int] = {}

    async def drain(host: ModelHost) -> None:  # every TP rank of this process at once
        left[host.rank] = len((await host.engine.drain(20.0)).left)

    async with anyio.create_task_group() as group:
        for host in hosts:
            group.start_soon(drain, host)
    return [host.summary(left[host.rank]) for host in hosts], seconds


def run_embedded(plan: ModelPlan) -> tuple[list[ModelRankSummary], float]:
    """The four ranks in this process, over loopback and in-process groups."""
    import anyio
    from kvhandoff.collectives import local_group
    from kvhandoff.engine.transports import loopback_group

    async def main() -> tuple[list[ModelRankSummary], float]:
        transports = loopback_group(WORLD)
        tp = [*local_group(TP, name="prefill-tp"),
              *local_group(TP, name="decode-tp", first_log_rank=TP)]
        kv = [*local_group(TP, name="prefill-kv"),
              *local_group(TP, name="decode-kv", first_log_rank=TP)]
        hosts = [_rank(plan, r, transports[r], tp[r], kv[r]) for r in range(WORLD)]
        async with contextlib.AsyncExitStack() as stack:
            for host in hosts:
                await stack.enter_async_context(host.engine)
            return await _drive(hosts)

    return anyio.run(main)


def run_mpi(plan: ModelPlan) -> tuple[list[ModelRankSummary], float] | None:
    """This process's rank of ``mpiexec -n 4``; every summary on rank 0, None elsewhere."""
    import anyio
    from kvhandoff.collectives import CheckedComm
    from kvhandoff.engine.transports import MPITransport
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    group = "prefill" if rank < TP else "decode"
    tp_comm = CheckedComm.from_mpi(world.Split(color=rank // TP, key=rank), name=f"{group}-tp")
    kv_comm = CheckedComm.from_mpi(world.Split(color=rank // TP, key=rank), name=f"{group}-kv")
    transport = MPITransport(world)
    host = _rank(plan, rank, transport, tp_comm, kv_comm)

    async def main() -> tuple[list[ModelRankSummary], float]:
        async with host.engine:
            return await _drive([host])

    world.Barrier()
    try:
        summaries, seconds = anyio.run(main)
    except BaseException:
        traceback.print_exc()  # the other ranks would wait for this one: end the job
        sys.stderr.flush()
        world.Abort(1)
        raise
    gathered = world.gather((summaries[0], seconds), root=0)
    transport.close()
    if gathered is None:
        return None
    return [s for s, _ in gathered], max(t for _, t in gathered)


def report(plan: ModelPlan, summaries: list[ModelRankSummary], seconds: float,
           out: IO[str]) -> int:
    """Print the run's table; 0 when every request matched and the books are clean."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out, width=100)
    decode = [s for s in summaries if s.role == "decode"]
    prefill_ranks = [s for s in summaries if s.role == "prefill"]
    outcomes = []
    for request in plan.requests:
        seen = [s.outcomes.get(request.index, "not_run")
                for s in sorted(summaries, key=lambda s: (s.role != "decode", s.rank))]
        outcomes.append(next((o for o in seen if o != "ok"), "ok"))
    ok = outcomes.count("ok")
    leaked = sum(s.leaked_blocks for s in summaries)
    left = sum(s.drain_left for s in summaries)
    sent = sum(s.bytes_sent for s in prefill_ranks)
    during = sum(s.bytes_during_forward for s in prefill_ranks)
    config = MODEL
    table = Table(title=f"kvhandoff demo --model: {MODEL_NAME} ({config['num_hidden_layers']} "
                        f"layers, {config['num_key_value_heads']} KV heads over TP={TP}), "
                        f"{len(plan.requests)} prompts, {plan.decode_steps} decode steps",
                  show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("requests ok", f"{ok}/{len(plan.requests)}")
    for reason in sorted(set(outcomes) - {"ok"}):
        table.add_row(f"  failed: {reason}", str(outcomes.count(reason)))
    table.add_row("KV bytes compared on decode",
                  f"{sum(s.kv_bytes_compared for s in decode) / 2**20:.2f} MiB")
    table.add_row("KV sent while later layers computed", f"{during / 2**20:.2f} of "
                  f"{sent / 2**20:.2f} MiB")
    table.add_row("seconds", f"{seconds:.1f}")
    table.add_row("leaked blocks", str(leaked))
    table.add_row("sessions left after drain", str(left))
    console.print(table)
    if ok == len(plan.requests) and not leaked and not left:
        console.print("OK: every request's KV bytes and greedy tokens matched decoding in one "
                      "place, and every corrupted block changed the tokens")
        return 0
    console.print("FAILED: " + ", ".join(
        what for what, bad in (("requests failed", ok != len(plan.requests)),
                               ("blocks leaked", leaked),
                               ("sessions left after drain", left)) if bad))
    return 1


def run(args: argparse.Namespace) -> int:
    """``kvhandoff demo --model``: the exit code (2: bad options or the hf extra missing)."""
    from kvhandoff.kvcache import MissingExtraError

    try:
        if args.backend not in ("embedded", "mpi"):
            raise ValueError(f"--model runs embedded or with --backend mpi, not --backend "
                             f"{args.backend}")
        plan = make_model_plan(args)
        _transformers()
    except (ValueError, MissingExtraError) as error:
        print(f"kvhandoff demo: {error}", file=sys.stderr)
        return 2
    import torch

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
                      f"{size}; run `mpiexec -n {WORLD} kvhandoff demo --model --backend "
                      "mpi`", file=sys.stderr)
            return 2
        result = run_mpi(plan)
        if result is None:
            return 0
    else:
        result = run_embedded(plan)
    return report(plan, *result, sys.stdout)
