"""MPITransport's region form under mpiexec -n 2: blocks move straight from the sender's
block tensors into the receiver's, byte-for-byte against ``cuda_ext.gather`` of the same
table, in every pairing of a region side with a buffer side; runs of consecutive ids, K/V
interleaved blocks (one region per block), a receive of the wrong size, a cancelled region
receive, and many region operations in flight.

Any failed check raises; ``mpi_main`` then aborts every rank.
"""

from __future__ import annotations

import torch
from _checks import check_pairings, drain
from _harness import mpi_main
from kvhandoff.engine.transports import HandleState, MPITransport
from kvhandoff.engine.transports._regions import block_regions


def tensors(seed: int, blocks: int = 64, count: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(blocks, 4, 2, 8, generator=gen).half() for _ in range(count)]


def check_interleaved(t: MPITransport) -> None:
    """K and V interleaved per block ([blocks, 2, ...] viewed per half): one region per
    block, still the packed order."""
    rank, peer = t.rank, 1 - t.rank
    kv = torch.randn(16, 2, 4, 8, generator=torch.Generator().manual_seed(3))
    layers = [kv[:, 0], kv[:, 1]]
    ids = [1, 2, 3, 9]
    if rank == 0:
        drain(t, [t.post_send_regions(block_regions(layers, ids), peer, 20)])
    else:
        out = torch.zeros(16, 2, 4, 8)
        dst = [out[:, 0], out[:, 1]]
        handle = t.post_recv_regions(block_regions(dst, ids), peer, 20)
        drain(t, [handle])
        assert handle.state is HandleState.DONE
        assert torch.equal(out[ids], kv[ids]) and not out[[0, 4, 15]].any()


def check_mismatch_and_cancel(t: MPITransport) -> None:
    rank, peer = t.rank, 1 - t.rank
    src = tensors(seed=4, blocks=8)
    if rank == 0:
        drain(t, [t.post_send_regions(block_regions(src, [0, 1]), peer, 30)])
    else:
        dst = [torch.zeros_like(x) for x in src]
        short = t.post_recv_regions(block_regions(dst, [0, 1, 2]), peer, 30)
        orphan = t.post_recv_regions(block_regions(dst, [5]), peer, 31)
        assert orphan.cancel() is True
        drain(t, [short, orphan])
        assert short.state is HandleState.FAILED and "size mismatch" in (short.error or "")
        assert (orphan.state, orphan.error) == (HandleState.FAILED, "cancelled")


def check_many_in_flight(t: MPITransport) -> None:
    """64 region operations at once, one per block, each its own datatype."""
    rank, peer = t.rank, 1 - t.rank
    src = tensors(seed=5, blocks=64, count=2)
    if rank == 0:
        handles = [t.post_send_regions(block_regions(src, [i]), peer, 100 + i)
                   for i in range(64)]
        drain(t, handles)
    else:
        dst = [torch.zeros_like(x) for x in src]
        handles = [t.post_recv_regions(block_regions(dst, [63 - i]), peer, 100 + i)
                   for i in range(64)]
        drain(t, handles)
        assert all(h.state is HandleState.DONE for h in handles)
        for s, d in zip(src, dst, strict=True):
            assert torch.equal(d, s.flip(0))


def main(comm) -> None:
    assert comm.Get_size() == 2, "run with 2 ranks"
    t = MPITransport(comm)
    assert t.moves_regions
    # Runs collapse into one region; out-of-order ids keep their order.
    check_pairings(t, tensors(seed=1), [5, 6, 7, 40, 2, 3, 63, 0],
                   [9, 10, 11, 12, 30, 31, 50, 1], tag=1)
    check_interleaved(t)
    check_mismatch_and_cancel(t)
    check_many_in_flight(t)
    comm.Barrier()
    t.close()
    print(f"rank {comm.Get_rank()} regions OK", flush=True)


if __name__ == "__main__":
    mpi_main(main)
