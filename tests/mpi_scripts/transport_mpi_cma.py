"""MPITransport's cross-memory path under mpiexec -n 2 (both ranks on this host):
``transport_mpi_cma.py MODE[,MODE...]``.

``transport``: the pair agrees on the path at construction; 512 KiB and 4 KiB blocks
(scattered ids, 16 layer tensors) move byte-for-byte in all four pairings of a region side
with a buffer side; a send stays pending until the receiver's ack (the receiver has not even
posted); a size mismatch fails both sides with ``size mismatch``; malformed descriptor bytes
fail the receive with a typed reason and leave the transport working; ``use_cma=False`` and
``KVHANDOFF_MPI_CMA=0`` keep the datatype path, which still moves the same bytes.
``engine``: a TransferEngine on poison pools (``BlockPool(debug=True)``) over the CMA path:
the receiver's loop is frozen after it advertised, the sender's host cancels and frees its
blocks mid-transfer: they stay out of circulation while the peer may still read them (no
ack yet), come back poisoned once it has, and the receiver sees the sender's bytes or a
cancellation, never anything else.

Any failed check raises; ``mpi_main`` then aborts every rank.
"""

from __future__ import annotations

import os
import sys
import zlib

import anyio
import numpy as np
import torch
from _checks import check_pairings, check_pool_whole, drain, wait_until
from _harness import mpi_main
from kvhandoff.engine import BlockPool, EngineConfig, TransferCancelled, TransferEngine
from kvhandoff.engine.transports import HandleState, MPITransport, _cma
from kvhandoff.engine.transports._regions import block_regions


def layer_tensors(seed: int, blocks: int, tensor_block_bytes: int) -> list[torch.Tensor]:
    """16 layer tensors (8 layers, K and V) of ``blocks`` blocks."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (blocks, tensor_block_bytes), dtype=torch.uint8,
                          generator=gen) for _ in range(16)]


def check_layout(t: MPITransport, tensor_block_bytes: int, blocks: int, tag: int) -> None:
    """``blocks`` of ``2 * blocks`` chosen at random on each side, in all four pairings."""
    rng = np.random.default_rng(tensor_block_bytes)
    ids = [int(b) for b in rng.choice(2 * blocks, blocks, replace=False)]
    recv_ids = [int(b) for b in rng.choice(2 * blocks, blocks, replace=False)]
    check_pairings(t, layer_tensors(1, 2 * blocks, tensor_block_bytes), ids, recv_ids, tag)


def check_send_pending_until_ack(t: MPITransport, comm) -> None:
    """The receiver posts only after the sender saw its send still pending: nothing can
    have acked it, so PENDING is the only state it may be in."""
    rank, peer = t.rank, 1 - t.rank
    data = torch.arange(4096, dtype=torch.int32)
    if rank == 0:
        send = t.post_send(data, peer, 200)
        for _ in range(100):
            assert t.poll() == [] and send.test() is HandleState.PENDING
        assert send.cancel() is False
    comm.Barrier()
    if rank == 1:
        out = torch.zeros_like(data)
        receive = t.post_recv(out, peer, 200)
        drain(t, [receive])
        assert receive.state is HandleState.DONE and torch.equal(out, data)
    comm.Barrier()
    if rank == 0:
        drain(t, [send])
        assert send.state is HandleState.DONE


def check_size_mismatch_both_sides(t: MPITransport) -> None:
    rank, peer = t.rank, 1 - t.rank
    if rank == 0:
        src = layer_tensors(2, 8, 256)
        handle = t.post_send_regions(block_regions(src, [1, 2]), peer, 210)
    else:
        handle = t.post_recv(torch.zeros(16 * 3 * 256, dtype=torch.uint8), peer, 210)
    drain(t, [handle])
    assert handle.state is HandleState.FAILED, handle
    assert handle.error is not None and handle.error.startswith("size mismatch"), handle.error


def check_malformed_descriptor(t: MPITransport, comm) -> None:
    """Bytes that are not a descriptor, on the data tag of a CMA receive: it fails, typed;
    one whose header is sound also tells the sender (an unknown op id here: dropped)."""
    from mpi4py import MPI

    rank, peer = t.rank, 1 - t.rank
    sound = _cma.encode_descriptor(99, os.getpid(), np.array([4096], np.uint64),
                                   np.array([64], np.uint64))
    broken = sound[:-8] + np.uint64(65).tobytes()  # its length no longer sums to nbytes
    if rank == 0:
        for tag, payload in ((220, b"not a descriptor"), (221, broken)):
            t.comm.Send([payload, MPI.BYTE], dest=peer, tag=tag)
    else:
        out = torch.zeros(64, dtype=torch.uint8)
        handles = [t.post_recv(out, peer, 220), t.post_recv(out, peer, 221)]
        drain(t, handles)
        for handle in handles:
            assert handle.state is HandleState.FAILED, handle
            assert "invalid cross-memory descriptor" in (handle.error or ""), handle.error
        assert not out.any()
    comm.Barrier()
    check_send_pending_until_ack(t, comm)  # still works
    if rank == 0:
        # Rank 1 answered op 99 before it acked that send (one source, one communicator:
        # in order), so by now the answer was taken and dropped: no send of ours owns it.
        assert t.cma_dropped_acks == 1, t.cma_dropped_acks


def check_datatype_path(comm, transport: MPITransport) -> None:
    assert transport.cma_peers == frozenset(), transport.cma_peers
    assert "disabled" in (transport.cma_unavailable or "")
    assert transport.region_min_bytes == MPITransport.region_min_bytes
    check_layout(transport, 256, 64, 300)
    comm.Barrier()
    transport.close()


def run_transport(comm) -> None:
    t = MPITransport(comm)
    peer = 1 - t.rank
    if t.cma_unavailable is not None:  # no ptrace permission here: the caller skips
        print(f"rank {t.rank} cma unavailable: {t.cma_unavailable}", flush=True)
        t.close()
        return
    assert t.cma_peers == frozenset({peer}) and t.cma_unavailable is None, t.cma_unavailable
    assert t.region_min_bytes == 4 << 10
    check_layout(t, 32 << 10, 128, 100)  # 128 blocks x 512 KiB
    check_layout(t, 256, 2048, 110)  # 2048 blocks x 4 KiB (a smaller table, same form)
    check_send_pending_until_ack(t, comm)
    check_size_mismatch_both_sides(t)
    check_malformed_descriptor(t, comm)
    comm.Barrier()
    t.close()
    check_datatype_path(comm, MPITransport(comm, use_cma=False))
    os.environ["KVHANDOFF_MPI_CMA"] = "0"
    try:
        check_datatype_path(comm, MPITransport(comm))
    finally:
        del os.environ["KVHANDOFF_MPI_CMA"]


# 2 layers of 16 tokens x 8 heads x 128 fp16: 32 KiB per layer tensor, 128 KiB per block.
LAYOUT = (2, 16, 8, 128)
NUM_BLOCKS = 96


async def run_engine(comm) -> None:
    rank = comm.Get_rank()
    pool = BlockPool(NUM_BLOCKS, *LAYOUT, dtype=torch.float16, debug=True)
    transport = MPITransport(comm)
    if transport.cma_unavailable is not None:
        print(f"rank {rank} cma unavailable: {transport.cma_unavailable}", flush=True)
        transport.close()
        return
    assert transport.cma_peers == frozenset({1 - rank}) and transport.region_min_bytes == 4096
    config = EngineConfig(queue_timeout_s=20.0, transfer_timeout_s=20.0, lease_s=20.0,
                          agreement_timeout_s=30.0, drain_timeout_s=10.0)
    count = 40  # 5 MiB: one piece of 40 blocks, on the region path (32 KiB regions)
    async with TransferEngine(pool, transport, config=config) as engine:
        ids = pool.alloc(count, owner="held")
        gen = torch.Generator().manual_seed(zlib.crc32(b"held"))
        data = [torch.randn((count, *pool.block_shape), generator=gen).half()
                for _ in pool.layers]
        if rank == 1:
            handle = engine.receive("held", ids, 0)  # advertises at once
            comm.Barrier()  # the loop is frozen: nothing is copied, nothing acked
            comm.Barrier()
            try:
                result = await handle.wait()
            except TransferCancelled:
                pass  # the sender's cancel won the race with the data
            else:
                assert result.nbytes == count * pool.block_nbytes
                for layer, expected in zip(pool.layers, data, strict=True):
                    assert torch.equal(layer[ids], expected), "not the sender's bytes"
            await wait_until(lambda: not pool.pinned_by("held"))
            pool.free(ids, owner="held")
        else:
            for layer, values in zip(pool.layers, data, strict=True):
                layer[ids] = values
            comm.Barrier()  # the receiver advertised and froze
            engine.send("held", ids, 1)
            # The sender posts its descriptors on its tick; then no ack can come.
            await wait_until(lambda: len(transport._cma_sends) > 0)
            engine.cancel("held")
            pool.free(ids, owner="held")  # deferred: the peer may still read them
            assert pool.pinned_by("held"), "blocks released while the peer may read them"
            grabbed = pool.alloc(pool.num_free, owner="grab")
            assert set(grabbed).isdisjoint(ids), "a block the peer may read was reused"
            for _ in range(50):
                await anyio.sleep(0)
                assert pool.pinned_by("held")  # still no ack: the receiver is frozen
            pool.free(grabbed, owner="grab")
            comm.Barrier()  # unfreeze the receiver: it copies, acks
            await wait_until(lambda: not pool.pinned_by("held"))
        comm.Barrier()
        report = await engine.drain(5.0)
        assert report.clean, report
    check_pool_whole(comm, pool, transport)


def main(comm) -> None:
    assert comm.Get_size() == 2, "run with 2 ranks"
    for mode in sys.argv[1].split(","):
        if mode == "transport":
            run_transport(comm)
        elif mode == "engine":
            anyio.run(run_engine, comm)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        print(f"rank {comm.Get_rank()} cma {mode} OK", flush=True)


if __name__ == "__main__":
    mpi_main(main)
