"""Seed 003 (FastDeploy PR 8034): per-layer transfer signals batched by rank-local timing
(the cache info arrived earlier on one rank, so its first layers went out as one batch) into
per-batch barriers. Unsafe: the ranks issue different numbers of barriers and the job
deadlocks (ended by the runner's watchdog). Checked: CollectiveDesyncError at the first
mismatched call. Fixed: one signal per layer on every rank whatever the timing; embedded, the
safe run also drives the engine's layer-wise path (``TransferEngine`` with TP groups), where
every rank posts one send per layer whatever order the handshake and the layers arrive in.
"""

from __future__ import annotations

from typing import Any

from kvhandoff.scenarios._collective_common import desync_lines, desync_outcome
from kvhandoff.scenarios._runner import CollectiveScenario, Hung, Outcome, Verdict

LAYERS = 4


def batches(rank: int, seed: int, fixed: bool) -> list[list[int]]:
    """Rank-local timing: on one rank the first two layers were ready together."""
    if not fixed and rank == seed % 4:
        return [[0, 1], *[[layer] for layer in range(2, LAYERS)]]
    return [[layer] for layer in range(LAYERS)]


def loop(comm: Any, mode: str, seed: int) -> int:
    for _batch in batches(comm.rank, seed, mode == "fixed"):
        comm.barrier()  # "layer sent" signal, one per batch
    return int(comm.allreduce(LAYERS))


def judge(mode: str, outcomes: dict[int, Outcome], hung: dict[int, Hung]) -> Verdict:
    size = 4
    if mode == "unsafe":
        if hung:
            return Verdict(True, ["hung: ranks issued different numbers of layer barriers"])
        return Verdict(False, [f"expected a deadlock, got: {outcomes}"])
    if hung:
        return Verdict(False, [f"unexpected hang of ranks {sorted(hung)}"])
    if mode == "checked":
        ok, lines = desync_lines(outcomes, size)
        return Verdict(ok, lines)
    ok = len(outcomes) == size and all(o["text"] == str(LAYERS * size) for o in outcomes.values())
    return Verdict(ok, [f"completed: {LAYERS} layer signals on every rank" if ok
                        else f"expected completion: {outcomes}"])


SCENARIO = CollectiveScenario("003", loop, lambda mode, result: desync_outcome(result), judge)


def engine_layerwise(seed: int) -> Verdict:
    """Two prefill TP ranks send one request layer-wise to two decode ranks; rank 0 sees every
    layer ready before the receiver's handshake, rank 1 the handshake first and its layers in
    a seeded order. Each rank's posts are counted: one per layer, same sizes, on both."""
    import random

    import anyio
    import anyio.lowlevel
    import torch
    from kvhandoff.collectives import local_group
    from kvhandoff.engine import BlockPool, EngineConfig, TransferEngine
    from kvhandoff.engine.transports import loopback_group
    from kvhandoff.scenarios._counting import CountingTransport
    from kvhandoff.sessions import State

    order = list(range(LAYERS))
    random.Random(seed).shuffle(order)

    async def main() -> Verdict:
        transports = [CountingTransport(t) for t in loopback_group(4)]
        comms = [*local_group(2, name="prefill-tp"),
                 *local_group(2, name="decode-tp", first_log_rank=2)]
        pools = [BlockPool(16, LAYERS, 4, 2, 8, dtype=torch.float32, debug=True)
                 for _ in range(4)]
        config = EngineConfig(queue_timeout_s=5.0, transfer_timeout_s=5.0, lease_s=10.0,
                              drain_timeout_s=5.0, agreement_timeout_s=5.0)
        engines = [TransferEngine(pools[r], transports[r], tp_comm=comms[r], config=config,
                                  layout_extra=(r % 2, 2)) for r in range(4)]
        rid = "layerwise"
        with anyio.fail_after(20):
            async with engines[0], engines[1], engines[2], engines[3]:
                srcs = [pools[r].alloc(3, owner=rid) for r in range(2)]
                dsts = [pools[r + 2].alloc(3, owner=rid) for r in range(2)]
                for r in range(2):
                    for layer in range(LAYERS):
                        pools[r].key(layer)[srcs[r]] = float(r + 1)
                sends = [engines[r].send(rid, srcs[r], r + 2, layerwise=True) for r in range(2)]
                for layer in range(LAYERS):  # rank 0: every layer before the handshake
                    sends[0].layer_ready(layer)
                recvs = [engines[r + 2].receive(rid, dsts[r], r, layerwise=True)
                         for r in range(2)]
                # Rank 1: the handshake first (its send saw the advertise: ADVERTISED, nothing
                # posted yet), then its layers in a seeded order, each after a tick.
                with anyio.fail_after(10):
                    while engines[1].session(rid).state is not State.ADVERTISED:
                        await anyio.lowlevel.checkpoint()
                for layer in order:
                    sends[1].layer_ready(layer)
                    ticks = engines[1].stats().ticks
                    with anyio.fail_after(10):
                        while engines[1].stats().ticks == ticks:
                            await anyio.lowlevel.checkpoint()
                for handle in [*sends, *recvs]:
                    await handle.wait()
                for r in range(2):
                    pools[r].free(srcs[r], owner=rid)
                    pools[r + 2].free(dsts[r], owner=rid)

                async def drain(engine: TransferEngine) -> None:
                    await engine.drain(5.0)

                async with anyio.create_task_group() as group:
                    for engine in engines:
                        group.start_soon(drain, engine)
        for comm in comms:
            comm.close()
        per_rank = [transports[r].send_sizes() for r in range(2)]
        ok = per_rank[0] == per_rank[1] and len(per_rank[0]) == LAYERS
        return Verdict(ok, [
            f"engine layer-wise: rank 0 (layers before handshake) posted {per_rank[0]}",
            f"engine layer-wise: rank 1 (handshake first, layers {order}) posted {per_rank[1]}",
            "identical per-layer granularity on both ranks" if ok else "granularity differs",
        ])

    return anyio.run(main)
