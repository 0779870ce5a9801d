"""TorchDistTransport over NCCL: ``python nccl_transport_ring.py WORLD`` starts WORLD ranks,
one GPU each (the default group is gloo, see tests/torch_scripts/_harness.py; the data group
is NCCL). Each rank moves tagged CUDA buffers around a ring in post order (NCCL ignores tags),
checks them byte for byte, exchanges control messages (on the transport's own gloo group) and
checks that a CPU buffer is refused. A failing rank ends the job with a non-zero exit."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "torch_scripts"))
from _harness import torch_main

DEADLINE_S = 60.0


def pattern(nbytes: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)


def rank_main(rank: int, world: int) -> None:
    from kvhandoff.engine._wire import Accept, decode, encode
    from kvhandoff.engine.transports import HandleState, InvalidBufferError, TorchDistTransport

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    t = TorchDistTransport(dist.new_group(backend="nccl"))
    assert (t.rank, t.world_size, t.backend) == (rank, world, "nccl"), (t.rank, t.backend)
    right, left = (rank + 1) % world, (rank - 1) % world
    sizes = [16 << 10, 1 << 20, 64 << 20]
    outs = [torch.zeros(n, dtype=torch.uint8, device=device) for n in sizes]
    # Sends and receives to a peer are posted in the same order on both sides.
    handles = [t.post_recv(out, left, 10 + i) for i, out in enumerate(outs)]
    handles += [t.post_send(pattern(n, 100 * rank + i).to(device), right, 10 + i)
                for i, n in enumerate(sizes)]
    start = time.monotonic()
    done: list[object] = []
    while len(done) < len(handles):
        done.extend(t.poll())
        assert time.monotonic() - start < DEADLINE_S, f"stuck: {len(done)}/{len(handles)}"
        time.sleep(0.0005)
    assert all(h.state is HandleState.DONE for h in handles), [h.error for h in handles]
    for i, out in enumerate(outs):
        assert torch.equal(out.cpu(), pattern(sizes[i], 100 * left + i)), i
    t.send_control(right, encode(Accept(f"req-{rank}", rank)))
    got: list[tuple[int, bytes]] = []
    while not got:
        got.extend(t.recv_control())
        assert time.monotonic() - start < DEADLINE_S, "control stuck"
        time.sleep(0.0005)
    assert got[0][0] == left and decode(got[0][1]) == Accept(f"req-{left}", left), got
    try:
        t.post_send(torch.zeros(4, dtype=torch.uint8), right, 1)
    except InvalidBufferError:
        pass
    else:
        raise AssertionError("a CPU buffer must be refused on NCCL")
    dist.barrier()
    t.close()
    print(f"rank {rank}/{world} nccl transport OK", flush=True)


if __name__ == "__main__":
    torch_main(rank_main, int(sys.argv[1]) if len(sys.argv) > 1 else 2)
