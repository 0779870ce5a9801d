"""MPITransport under mpiexec, any number of ranks: concurrent tagged transfers in a ring and
all-to-all, byte-for-byte checks, Testsome completions reported once each, control messages
both ways, a cancelled receive, a size mismatch, and FaultyTransport over MPI.

Any failed check raises; ``mpi_main`` then aborts every rank.
"""

from __future__ import annotations

import time

import torch
from _checks import DEADLINE_S, drain
from _harness import mpi_main
from kvhandoff.engine._wire import Advertise, Done, decode, encode, layout_fingerprint
from kvhandoff.engine.transports import (
    Fault,
    FaultyTransport,
    HandleKind,
    HandleState,
    MPITransport,
    TransportClosedError,
)


def pattern(nbytes: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)


def control_from_all(transport, expect: int) -> list[tuple[int, bytes]]:
    got: list[tuple[int, bytes]] = []
    start = time.monotonic()
    while len(got) < expect:
        got.extend(transport.recv_control())
        transport.poll()
        assert time.monotonic() - start < DEADLINE_S, f"control stuck: {got}"
    return got


def check_ring(t: MPITransport) -> None:
    """Each rank sends 24 concurrent transfers of mixed sizes and dtypes to its right
    neighbour and receives 24 from its left one, tags chosen by the receiver side."""
    rank, size = t.rank, t.world_size
    right, left = (rank + 1) % size, (rank - 1) % size
    sizes = [4096 * (1 + i % 7) for i in range(23)] + [8 << 20]
    handles, outs = [], []
    for i, nbytes in enumerate(sizes):
        outs.append(torch.zeros(nbytes // 2, dtype=torch.bfloat16))  # any dtype: bytes move
        handles.append(t.post_recv(outs[-1], left, 100 + i))
    for i, nbytes in enumerate(sizes):
        handles.append(t.post_send(pattern(nbytes, 1000 * rank + i), right, 100 + i))
    for h in handles:
        h.token = ("ring", h.tag)
    done = drain(t, handles)
    assert all(h.state is HandleState.DONE for h in done), [h for h in done if h.error]
    assert {h.token for h in done} == {("ring", 100 + i) for i in range(len(sizes))}
    for i, out in enumerate(outs):
        assert torch.equal(out.view(torch.uint8), pattern(sizes[i], 1000 * left + i)), i


def check_all_to_all(t: MPITransport) -> None:
    rank, size = t.rank, t.world_size
    handles, outs = [], {}
    for peer in range(size):
        if peer == rank:
            continue
        for k in range(3):
            outs[(peer, k)] = torch.zeros(1000 + k, dtype=torch.uint8)
            handles.append(t.post_recv(outs[(peer, k)], peer, 7))  # same tag: post order
    for peer in range(size):
        if peer != rank:
            for k in range(3):
                handles.append(t.post_send(pattern(1000 + k, 100 * rank + 10 * peer + k), peer, 7))
    assert all(h.state is HandleState.DONE for h in drain(t, handles))
    for (peer, k), out in outs.items():
        assert torch.equal(out, pattern(1000 + k, 100 * peer + 10 * rank + k)), (peer, k)


def check_control(t: MPITransport) -> None:
    rank, size = t.rank, t.world_size
    fp = layout_fingerprint(4, (16, 8, 64), torch.float16, extra=(rank,))
    for peer in range(size):
        if peer != rank:
            t.send_control(peer, encode(Advertise(f"req-{rank}-{peer}", 4, 4 * 2048, fp, 9)))
            t.send_control(peer, encode(Done(f"req-{rank}-{peer}")))
    got = control_from_all(t, 2 * (size - 1))
    by_source: dict[int, list] = {}
    for source, payload in got:
        by_source.setdefault(source, []).append(decode(payload))
    assert sorted(by_source) == [p for p in range(size) if p != rank]
    for source, messages in by_source.items():
        adv, done = messages  # per-source order preserved
        assert adv == Advertise(
            f"req-{source}-{rank}", 4, 4 * 2048,
            layout_fingerprint(4, (16, 8, 64), "float16", extra=(source,)), 9,
        )
        assert done == Done(f"req-{source}-{rank}")


def check_cancel_and_mismatch(t: MPITransport) -> None:
    rank, size = t.rank, t.world_size
    right, left = (rank + 1) % size, (rank - 1) % size
    assert t.cancellable_kinds == frozenset({HandleKind.RECV}) and not t.cancellable
    # A receive nobody will ever match, cancelled.
    orphan = t.post_recv(torch.zeros(64, dtype=torch.uint8), left, 31000)
    assert orphan.test() is HandleState.PENDING
    assert orphan.cancel() is True
    (reported,) = drain(t, [orphan])
    assert (reported.state, reported.error) == (HandleState.FAILED, "cancelled")
    # Sizes that disagree: too short a message, and too long a message.
    short_recv = t.post_recv(torch.zeros(128, dtype=torch.uint8), left, 31001)
    long_recv = t.post_recv(torch.zeros(32, dtype=torch.uint8), left, 31002)
    send_a = t.post_send(pattern(64, 1), right, 31001)
    send_b = t.post_send(pattern(64, 2), right, 31002)
    assert send_b.cancel() is False  # MPI cannot cancel sends
    drain(t, [short_recv, long_recv, send_a, send_b])
    assert short_recv.state is HandleState.FAILED and "size mismatch" in short_recv.error
    # MPI truncates a too-long message; the cross-memory path reads its size first.
    too_long = "size mismatch" if left in t.cma_peers else "MPI error"
    assert long_recv.state is HandleState.FAILED and long_recv.error.startswith(too_long)
    # The transport still works after failed operations.
    out = torch.zeros(16, dtype=torch.uint8)
    ok = [t.post_recv(out, left, 31003), t.post_send(pattern(16, rank), right, 31003)]
    assert all(h.state is HandleState.DONE for h in drain(t, ok))
    assert torch.equal(out, pattern(16, left))


def check_faulty(comm) -> None:
    """Faults over MPI: a stuck send is not cancellable while MPI still owns it."""
    inner = MPITransport(comm)
    t = FaultyTransport(inner, seed=1, faults={0: Fault.STUCK, 1: Fault.ERROR})
    rank, size = t.rank, t.world_size
    right, left = (rank + 1) % size, (rank - 1) % size
    stuck = t.post_send(pattern(1 << 20, rank), right, 5)  # rendezvous size: needs the peer
    failing = t.post_recv(torch.zeros(16, dtype=torch.uint8), left, 6)
    out = torch.zeros(1 << 20, dtype=torch.uint8)
    recv = t.post_recv(out, left, 5)
    send = t.post_send(pattern(16, rank), right, 6)
    drain(t, [failing, recv, send])
    assert failing.error == "injected error" and recv.state is HandleState.DONE
    assert torch.equal(out, pattern(1 << 20, left))
    stuck.inner.wait(DEADLINE_S)
    assert stuck.test() is HandleState.PENDING  # really sent, reported never
    assert stuck.cancel() is True
    assert drain(t, [stuck])[0].error == "cancelled"
    comm.Barrier()
    t.close()


def main(comm) -> None:
    t = MPITransport(comm)
    assert (t.rank, t.world_size) == (comm.Get_rank(), comm.Get_size())
    assert t.max_tag >= 32767
    assert t.comm is not comm
    check_ring(t)
    check_all_to_all(t)
    check_control(t)
    check_cancel_and_mismatch(t)
    comm.Barrier()  # every control message was received before anyone closes
    orphan = t.post_recv(torch.zeros(8, dtype=torch.uint8), (t.rank + 1) % t.world_size, 9)
    t.close()  # cancels the pending receive; poll still reports it
    assert t.poll() == [orphan] and orphan.error == "cancelled", orphan
    assert t.recv_control() == []
    try:
        t.post_send(torch.zeros(4), (t.rank + 1) % t.world_size, 1)
    except TransportClosedError:
        pass
    else:
        raise AssertionError("post after close must raise TransportClosedError")
    check_faulty(comm)
    print(f"rank {comm.Get_rank()}/{comm.Get_size()} transport OK", flush=True)


if __name__ == "__main__":
    mpi_main(main)
