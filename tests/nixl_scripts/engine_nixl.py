"""TransferEngine over NixlTransport, two processes on 127.0.0.1 (rank 0 sends, rank 1
receives), debug (poison) pools. Run by tests/engine/test_engine_nixl.py through the launcher
in _launch.py (``python engine_nixl.py SCENARIO``: every rank killed if one fails or the job
outlives its deadline).

``transfers``: whole and layer-wise transfers (one WRITE per chunk), ids scattered over the pool,
byte-verified on the receiver; the region path (no staging buffer) on both sides; every free
block still poisoned; token counts that leave the last block partly empty write only its
valid slots (the receiver's slots past the count keep their bytes).

``cancel_advertised``: the receiver cancels while its advertisement is out and the sender
has not sent: the cancel is requested (not safe to free), the blocks stay pinned until the
sender's transport confirms it never wrote, then come back poisoned.
``cancel_in_flight``: the sender cancels with its WRITE in flight (``UCX_TLS=tcp``, the target
stopped): not safe to free, its blocks stay pinned until the WRITE is final. ``deadline``:
the same stuck WRITE passes its transfer deadline: the sender's session is quarantined (health
says so) until the WRITE is final. ``initiator_killed``: the sender SIGKILLs itself with its
WRITE in flight: the receiver fails ``peer_lost`` at once through the transport's probe (well
within its lease), keeps its blocks pinned through the fencing grace, then releases them,
poisoned.

Messages outside the engine (a pid to stop) go through files in the rendezvous folder: the
NIXL control channel belongs to the engines.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import anyio
import torch
from kvhandoff.engine import (
    BlockPool,
    EngineConfig,
    TransferCancelled,
    TransferEngine,
    TransferError,
)
from kvhandoff.engine.transports import NixlTransport
from kvhandoff.sessions import CancelResult, FailureReason, State

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _launch import rank_main

LIMIT_S = 30.0  # any wait below gives up (and fails the rank) after this long
# 2 layers of 16 tokens x 8 heads x 128 fp16: 32 KiB per layer tensor, 128 KiB per block.
LAYOUT = (2, 16, 8, 128)
NUM_BLOCKS = 320


def make_pool() -> BlockPool:
    return BlockPool(NUM_BLOCKS, *LAYOUT, dtype=torch.float16, debug=True)


def config(**overrides: float) -> EngineConfig:
    values: dict[str, float] = dict(queue_timeout_s=LIMIT_S, transfer_timeout_s=LIMIT_S,
                                    lease_s=LIMIT_S, agreement_timeout_s=LIMIT_S,
                                    drain_timeout_s=10.0)
    values.update(overrides)
    return EngineConfig(**values)  # type: ignore[arg-type]


def connect(rank: int, folder: str, **kwargs: float) -> NixlTransport:
    return NixlTransport.rendezvous(folder, rank, 2, timeout_s=LIMIT_S, **kwargs)


def pattern(pool: BlockPool, rid: str, count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(zlib.crc32(rid.encode()))
    return [torch.randn((count, *pool.block_shape), generator=gen).half() for _ in pool.layers]


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + LIMIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await anyio.sleep(0.001)  # yield to the engine's loop; the predicate decides


def post_file(folder: str, name: str, text: str) -> None:
    temporary = Path(folder) / f".{name}.tmp"
    temporary.write_text(text)
    os.replace(temporary, Path(folder) / name)


async def read_file(folder: str, name: str) -> str:
    path = Path(folder) / name
    await wait_until(path.exists, f"the file {name}")
    return path.read_text()


async def goodbye(engine: TransferEngine, folder: str, rank: int) -> None:
    """Nobody leaves while its peer may still need it (an unanswered retraction, say)."""
    post_file(folder, f"bye{rank}", "")
    await read_file(folder, f"bye{1 - rank}")
    report = await engine.drain(10.0)
    assert report.clean, report


# (request id, block count, layer-wise, tokens): 70 blocks = 8.75 MiB, layer-wise 100
# blocks = 6.25 MiB per layer, one block; then counts that leave the last block partly
# empty (None: every slot).
TOKENS = LAYOUT[1]
TRANSFERS = [("big", 70, False, None), ("layers", 100, True, None), ("one", 1, False, None),
             ("partial", 50, False, 49 * TOKENS + 5), ("partial-layers", 30, True, 30 * TOKENS - 2),
             ("partial-one", 1, False, 3)]
SENTINEL = 7.0  # what a receiver's blocks hold before the transfer


async def transfers(rank: int, folder: str) -> None:
    pool = make_pool()
    transport = connect(rank, folder)
    order = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(7)).tolist()
    tables, start = {}, 0
    for rid, count, _, _ in TRANSFERS:
        ids = order[start:start + count]
        ids[: count // 3] = sorted(ids[: count // 3])  # some runs of consecutive ids
        tables[rid], start = ids, start + count
    everything = pool.alloc(NUM_BLOCKS, owner="host")
    used = {b for ids in tables.values() for b in ids}
    pool.free([b for b in everything if b not in used], owner="host")
    async with TransferEngine(pool, transport, config=config()) as engine:
        assert transport.registered_bytes >= sum(t.nbytes for t in pool.layers)
        handles = []
        for rid, count, layerwise, tokens in TRANSFERS:
            ids = tables[rid]
            if rank == 0:
                for layer, data in zip(pool.layers, pattern(pool, rid, count), strict=True):
                    layer[ids] = data
                handle = engine.send(rid, ids, 1, layerwise=layerwise, num_tokens=tokens)
                if layerwise:
                    for layer in reversed(range(pool.num_layers)):
                        handle.layer_ready(layer)
            else:
                for layer in pool.layers:
                    layer[ids] = SENTINEL
                handle = engine.receive(rid, ids, 0, layerwise=layerwise, num_tokens=tokens)
            handles.append(handle)
        moved = 0
        with anyio.fail_after(LIMIT_S):
            for handle in handles:
                moved += (await handle.wait()).nbytes
        if rank == 1:
            for rid, count, _, tokens in TRANSFERS:
                valid = (tokens or count * TOKENS) - (count - 1) * TOKENS  # NHD: a prefix
                for layer, data in zip(pool.layers, pattern(pool, rid, count), strict=True):
                    got = layer[tables[rid]]
                    assert torch.equal(got[:-1], data[:-1]), f"{rid} differs"
                    assert torch.equal(got[-1, :valid], data[-1, :valid]), f"{rid} differs"
                    assert bool((got[-1, valid:] == SENTINEL).all()), f"{rid} wrote past"
            pool.assert_poisoned()  # nothing written outside the tables
        stats = engine.stats()
        assert stats.completed == len(TRANSFERS), stats
        assert stats.staging_allocations == 0, stats  # the region path on both sides
        assert moved == (stats.bytes_sent if rank == 0 else stats.bytes_received), stats
        await goodbye(engine, folder, rank)
    pool.free(sorted(used), owner="host")
    pool.check()
    pool.assert_poisoned()
    transport.close()
    assert transport.pending == 0 and transport.release_memory()


async def cancel_advertised(rank: int, folder: str) -> None:
    pool = make_pool()
    transport = connect(rank, folder)
    async with TransferEngine(pool, transport, config=config()) as engine:
        if rank == 1:
            ids = pool.alloc(8, owner="host")
            handle = engine.receive("adv", ids, 0)
            assert handle.state is State.IN_FLIGHT  # posted: the peer may write from now
            result = engine.cancel("adv")
            # Not terminal-and-free: the sender's transport may be writing the blocks.
            assert result is CancelResult.CANCEL_REQUESTED_IN_FLIGHT, result
            assert not result.safe_to_free
            try:
                with anyio.fail_after(LIMIT_S):
                    await handle.wait()
                raise AssertionError("the cancelled receive completed")
            except TransferCancelled:
                pass
            pool.free(ids, owner="host")  # deferred while the engine pins them
            await wait_until(lambda: engine.was_released("adv"), "the retraction's answer")
            assert engine.session("adv").state is State.FAILED
            assert pool.num_deferred == 0 and pool.num_pinned == 0
            pool.assert_poisoned()  # nothing wrote into the retracted blocks
        await goodbye(engine, folder, rank)
    pool.check()
    transport.close()
    assert transport.pending == 0 and transport.release_memory()


async def _stuck_sender(transport: NixlTransport, engine: TransferEngine, pool: BlockPool,
                        folder: str, rid: str) -> tuple[int, list[int]]:
    """Stop the receiver once its advertise is here (over tcp a stopped process sends
    nothing more), then send: the WRITE stays in flight while the receiver is stopped."""
    pid = int(await read_file(folder, "pid1"))
    # The engine's ADVERTISE follows the transport's own on one ordered channel: once it is
    # here (kept as an early advertise), so is the advertisement the WRITE goes into.
    await wait_until(lambda: engine.stats().early_advertises == 1, "the advertise")
    os.kill(pid, signal.SIGSTOP)
    ids = pool.alloc(NUM_BLOCKS // 2, owner="host")
    for layer in pool.layers:
        layer[ids] = 7
    engine.send(rid, ids, 1)
    await wait_until(lambda: bool(engine.session(rid).state is State.IN_FLIGHT
                                  and transport.pending), "the WRITE posted")
    return pid, ids


async def _stuck_receiver(pool: BlockPool, engine: TransferEngine, folder: str,
                          rid: str) -> list[int]:
    ids = pool.alloc(NUM_BLOCKS // 2, owner="host")
    engine.receive(rid, ids, 0)
    post_file(folder, "pid1", str(os.getpid()))
    return ids


async def cancel_in_flight(rank: int, folder: str) -> None:
    pool = make_pool()
    transport = connect(rank, folder)
    async with TransferEngine(pool, transport, config=config()) as engine:
        if rank == 1:
            ids = await _stuck_receiver(pool, engine, folder, "fly")
            await wait_until(lambda: engine.was_released("fly"), "the transfer to end")
            # The sender cancelled: whatever landed, the outcome is a failure and the
            # blocks are released only now that the WRITE is final.
            assert engine.session("fly").state is State.FAILED
            pool.free(ids, owner="host")
        else:
            pid, ids = await _stuck_sender(transport, engine, pool, folder, "fly")
            result = engine.cancel("fly")
            assert result is CancelResult.CANCEL_REQUESTED_IN_FLIGHT, result
            assert not result.safe_to_free
            pool.free(ids, owner="host")
            assert pool.num_deferred == len(ids)  # the WRITE still reads them
            assert not engine.was_released("fly") and transport.pending > 0
            os.kill(pid, signal.SIGCONT)
            await wait_until(lambda: engine.was_released("fly"), "the WRITE to be final")
            assert pool.num_deferred == 0
        await goodbye(engine, folder, rank)
    pool.check()
    pool.assert_poisoned()
    transport.close()


async def deadline(rank: int, folder: str) -> None:
    pool = make_pool()
    transport = connect(rank, folder)
    # The sender's deadline (and its wait for the receiver's word past it) is short; the
    # receiver's is not (it is stopped meanwhile).
    timeout = 1.0 if rank == 0 else LIMIT_S
    settings = config(transfer_timeout_s=timeout, confirm_grace_s=timeout)
    async with TransferEngine(pool, transport, config=settings) as engine:
        if rank == 1:
            ids = await _stuck_receiver(pool, engine, folder, "late")
            await wait_until(lambda: engine.was_released("late"), "the transfer to end")
            pool.free(ids, owner="host")
        else:
            pid, ids = await _stuck_sender(transport, engine, pool, folder, "late")
            pool.free(ids, owner="host")
            await wait_until(lambda: engine.session("late").state is State.QUARANTINED,
                             "the deadline")
            snapshot = engine.session("late")
            assert snapshot.failure is not None
            assert snapshot.failure.reason is FailureReason.TRANSFER_TIMEOUT, snapshot
            # The WRITE cannot be cancelled: quarantined, the blocks pinned, health told.
            await wait_until(lambda: engine.health().quarantined == 1, "health to see it")
            assert pool.num_deferred == len(ids) and transport.pending > 0
            os.kill(pid, signal.SIGCONT)
            await wait_until(lambda: engine.was_released("late"), "the WRITE to be final")
            assert engine.session("late").state is State.FAILED
            assert pool.num_deferred == 0
        await goodbye(engine, folder, rank)
    pool.check()
    pool.assert_poisoned()
    transport.close()


async def target_killed(rank: int, folder: str) -> None:
    pool = make_pool()
    transport = connect(rank, folder)
    # A long lease: the failure must come from the transport (the WRITE's own error).
    async with TransferEngine(pool, transport, config=config(lease_s=600.0)) as engine:
        if rank == 1:
            await _stuck_receiver(pool, engine, folder, "gone")
            await anyio.sleep(LIMIT_S)  # stopped, then killed, by rank 0
            raise AssertionError("the receiver should have been killed")
        pid, ids = await _stuck_sender(transport, engine, pool, folder, "gone")
        handle = engine._transfers["gone"].handle
        assert handle is not None
        pool.free(ids, owner="host")
        os.kill(pid, signal.SIGKILL)
        try:
            with anyio.fail_after(LIMIT_S):
                await handle.wait()
            raise AssertionError("the send to a dead receiver completed")
        except TransferError as exc:
            # The bytes may all have landed before it died: the sender cannot know.
            assert exc.reason is FailureReason.PEER_LOST and exc.outcome_unknown, exc
        await wait_until(lambda: engine.was_released("gone"), "the WRITE to be final")
        assert pool.num_deferred == 0 and transport.pending == 0
        report = await engine.drain(5.0)
        assert report.clean, report
    pool.check()
    pool.assert_poisoned()


async def initiator_killed(rank: int, folder: str) -> None:
    pool = make_pool()
    if rank == 0:
        transport = connect(rank, folder)
        async with TransferEngine(pool, transport, config=config()) as engine:
            pid, _ = await _stuck_sender(transport, engine, pool, folder, "dead")
            os.kill(pid, signal.SIGCONT)
            os.kill(os.getpid(), signal.SIGKILL)  # mid-transfer, no goodbye
    # A long lease: the failure must come from the transport's probe, not the lease.
    transport = connect(rank, folder, probe_interval_s=0.05, fence_grace_s=3.0)
    async with TransferEngine(pool, transport, config=config(lease_s=600.0)) as engine:
        ids = await _stuck_receiver(pool, engine, folder, "dead")
        handle = engine._transfers["dead"].handle
        assert handle is not None
        try:
            with anyio.fail_after(LIMIT_S):
                await handle.wait()
            raise AssertionError("the receive from a dead sender completed")
        except TransferError as exc:
            assert exc.reason is FailureReason.PEER_LOST, exc
        # Failed, and quarantined through the fencing grace: a NIC may still land a write.
        assert engine.session("dead").state is State.QUARANTINED
        pool.free(ids, owner="host")
        assert pool.num_deferred == len(ids)
        await wait_until(lambda: engine.was_released("dead"), "the fencing grace")
        assert pool.num_deferred == 0
        pool.assert_poisoned(ids)  # freed only after the grace: poisoned, and intact since
        again = pool.alloc(NUM_BLOCKS)  # alloc verifies the poison of every block it hands
        assert len(again) == NUM_BLOCKS
        report = await engine.drain(5.0)
        assert report.clean, report


SCENARIOS = {"transfers": transfers, "cancel_advertised": cancel_advertised,
             "cancel_in_flight": cancel_in_flight, "deadline": deadline,
             "target_killed": target_killed, "initiator_killed": initiator_killed}


def _runner(name: str) -> Callable[[int, int, str], None]:
    def run(rank: int, world: int, folder: str) -> None:
        assert world == 2
        anyio.run(SCENARIOS[name], rank, folder)
    return run


if __name__ == "__main__":
    rank_main({name: _runner(name) for name in SCENARIOS})
