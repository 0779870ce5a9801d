"""TorchDistTransport over gloo: ``python transport_torch_gloo.py WORLD`` starts WORLD ranks
(see _harness.py). Each rank moves concurrent tagged transfers around a ring and checks
them byte for byte, exchanges control messages with every peer, and checks the transport's
contract (completions reported once, no cancel, closed transport refuses work). A failing
rank ends the job with a non-zero exit."""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist
from _harness import torch_main

DEADLINE_S = 60.0


def pattern(nbytes: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)


def drain(transport, handles):
    wanted = {id(h) for h in handles}
    seen = []
    start = time.monotonic()
    while len(seen) < len(handles):
        for handle in transport.poll():
            assert id(handle) in wanted and all(handle is not s for s in seen), handle
            seen.append(handle)
        assert time.monotonic() - start < DEADLINE_S, f"stuck: {len(seen)}/{len(handles)}"
        time.sleep(0.0005)
    return seen


def rank_main(rank: int, world: int) -> None:
    from kvhandoff.engine._wire import Accept, Heartbeat, decode, encode
    from kvhandoff.engine.transports import (
        HandleState,
        InvalidBufferError,
        TorchDistTransport,
        TransportClosedError,
    )

    t = TorchDistTransport()
    assert (t.rank, t.world_size, t.backend) == (rank, world, "gloo")
    assert not t.cancellable and t.cancellable_kinds == frozenset()
    right, left = (rank + 1) % world, (rank - 1) % world

    sizes = [4096 * (1 + i % 5) for i in range(15)] + [4 << 20]
    outs = [torch.zeros(n // 4, dtype=torch.float32) for n in sizes]  # dtype is irrelevant
    handles = [t.post_recv(out, left, 10 + i) for i, out in enumerate(outs)]
    handles += [t.post_send(pattern(n, 100 * rank + i), right, 10 + i)
                for i, n in enumerate(sizes)]
    for h in handles:
        h.token = (h.kind, h.tag)
    assert handles[0].cancel() is False
    done = drain(t, handles)
    assert all(h.state is HandleState.DONE for h in done), [h.error for h in done]
    for i, out in enumerate(outs):
        assert torch.equal(out.view(torch.uint8), pattern(sizes[i], 100 * left + i)), i

    for peer in range(world):
        if peer != rank:
            t.send_control(peer, encode(Accept(f"req-{rank}", 10 + peer)))
            t.send_control(peer, encode(Heartbeat(rank, 1, 0)))
    got: dict[int, list] = {}
    start = time.monotonic()
    while sum(len(v) for v in got.values()) < 2 * (world - 1):
        for source, payload in t.recv_control():
            got.setdefault(source, []).append(decode(payload))
        assert time.monotonic() - start < DEADLINE_S, f"control stuck: {got}"
        time.sleep(0.0005)
    for source, messages in got.items():
        assert messages == [Accept(f"req-{source}", 10 + rank), Heartbeat(source, 1, 0)]

    try:
        t.post_send(torch.zeros(4), right, 0)
    except Exception as exc:  # tag 0 is the control channel's
        assert type(exc).__name__ == "InvalidTagError", exc
    else:
        raise AssertionError("tag 0 must be refused")
    try:
        t.post_send(torch.zeros(4, 4).t(), right, 1)
    except InvalidBufferError:
        pass
    else:
        raise AssertionError("a non-contiguous buffer must be refused")

    dist.barrier()
    t.close()
    try:
        t.post_recv(torch.zeros(4), left, 1)
    except TransportClosedError:
        pass
    else:
        raise AssertionError("post after close must raise")
    print(f"rank {rank}/{world} torch transport OK", flush=True)


if __name__ == "__main__":
    torch_main(rank_main, int(sys.argv[1]) if len(sys.argv) > 1 else 2)
