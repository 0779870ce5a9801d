"""Checks shared by the transport and engine scripts run under mpiexec (next to ``_harness``,
which keeps its import light for the scripts that need no torch).

``drain`` polls a transport until each of the given handles was reported, once, by
``poll()``; ``wait_until`` yields to an engine's loop until a condition holds; both fail (and
so abort the job) after a deadline instead of hanging. ``check_pairings`` moves one table of
blocks from rank 0 to rank 1 in each pairing of a region side with a buffer side and checks
the bytes that land, and that nothing outside the receiver's blocks was written.
``check_pool_whole`` ends an engine scenario on a debug pool: every block back, none
written after it was freed. ``start_pair`` starts one request of the two-rank scripts (rank
0 sends, rank 1 receives) and ``expect_failure`` awaits a handle that must fail.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import torch
from kvhandoff import cuda_ext
from kvhandoff.engine import BlockPool, TransferEngine, TransferError, TransferHandle
from kvhandoff.engine.transports import HandleState, Transport, TransportHandle
from kvhandoff.engine.transports._regions import block_regions

DEADLINE_S = 30.0

#: (the send moves regions, the receive takes regions); False: a packed buffer on that side.
PAIRINGS = ((True, True), (True, False), (False, True), (False, False))


def drain(transport: Transport, handles: Sequence[TransportHandle]) -> list[TransportHandle]:
    """Poll until every handle was reported; each is reported exactly once, final, and
    nothing else is. The handles in the order ``poll()`` reported them."""
    wanted = {id(h) for h in handles}
    seen: list[TransportHandle] = []
    start = time.monotonic()
    while len(seen) < len(handles):
        for handle in transport.poll():
            assert id(handle) in wanted, f"unexpected completion {handle}"
            assert all(handle is not s for s in seen), f"reported twice: {handle}"
            assert handle.final
            seen.append(handle)
        assert time.monotonic() - start < DEADLINE_S, f"stuck: {len(seen)}/{len(handles)}"
    return seen


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await anyio.sleep(0.001)  # yield to the engine's loop; the predicate decides


def check_pairings(t: Transport, src: list[torch.Tensor], ids: Sequence[int],
                   recv_ids: Sequence[int], tag: int,
                   pairings: Sequence[tuple[bool, bool]] = PAIRINGS) -> None:
    """Rank 0 sends blocks ``ids`` of ``src`` (every rank builds the same ``src``) to rank
    1, once per pairing, on tags ``tag, tag + 1, ...``: as regions or as the packed buffer
    ``gather()`` makes of them. Rank 1 receives into blocks ``recv_ids`` of zeroed tensors
    shaped like ``src``, or into a buffer; both sides end ``DONE``, the receiver holds
    exactly the packed bytes, and its other blocks stay zero."""
    rank, peer = t.rank, 1 - t.rank
    expected = torch.empty(sum(x[0].numel() * x.element_size() for x in src) * len(ids),
                           dtype=torch.uint8)
    cuda_ext.gather(src, list(ids), expected)
    untouched = sorted(set(range(src[0].shape[0])) - set(recv_ids))
    for offset, (send_regions, recv_regions) in enumerate(pairings):
        if rank == 0:
            handle = (t.post_send_regions(block_regions(src, ids), peer, tag + offset)
                      if send_regions else t.post_send(expected, peer, tag + offset))
            drain(t, [handle])
            assert handle.state is HandleState.DONE, handle
            continue
        dst = [torch.zeros_like(x) for x in src]
        buf = torch.zeros_like(expected)
        handle = (t.post_recv_regions(block_regions(dst, recv_ids), peer, tag + offset)
                  if recv_regions else t.post_recv(buf, peer, tag + offset))
        drain(t, [handle])
        assert handle.state is HandleState.DONE, handle
        assert handle.nbytes == expected.numel(), (handle.nbytes, expected.numel())
        if recv_regions:
            cuda_ext.gather(dst, list(recv_ids), buf)
            assert all(not x[untouched].any() for x in dst), "wrote outside its blocks"
        assert torch.equal(buf, expected), f"pairing {offset} (tag {tag + offset}): bytes differ"


def check_pool_whole(comm: Any, pool: BlockPool, transport: Transport) -> None:
    """After the engine exited: the pool is consistent, every block is free, and none was
    written after its free (a debug pool's alloc raises ``PoisonError`` on a late write);
    then, once every rank got here, the transport closes."""
    pool.check()
    assert pool.num_free == pool.num_blocks, pool
    pool.alloc(pool.num_blocks, owner="final")
    comm.Barrier()
    transport.close()


def start_pair(engine: TransferEngine, rank: int, request_id: str, block_ids: Sequence[int],
               **kwargs: Any) -> TransferHandle:
    """Rank 0 sends ``request_id`` to rank 1, rank 1 receives it from rank 0."""
    if rank == 0:
        return engine.send(request_id, block_ids, 1, **kwargs)
    return engine.receive(request_id, block_ids, 0, **kwargs)


async def expect_failure(handle: TransferHandle, error: type[TransferError],
                         why: str, reason: Any = None) -> TransferError:
    """Await ``handle``, which must fail with ``error`` (and ``reason``, when given);
    ``why`` says why it must not complete."""
    try:
        await handle.wait()
    except error as exc:
        assert reason is None or exc.reason is reason, exc
        return exc
    raise AssertionError(why)
