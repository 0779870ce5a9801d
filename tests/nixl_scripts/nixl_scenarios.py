"""Two-process (and TP=2, four-process) scenarios of NixlTransport on 127.0.0.1.

Run by tests/engine/transports/test_transport_nixl.py through the launcher in _launch.py:
``python nixl_scenarios.py SCENARIO --world N`` starts the ranks, kills them all if one fails
or the job outlives its deadline. The scenarios that need a WRITE to stay in flight run with
``UCX_TLS=tcp`` (set by the test): over tcp the target's own progress lands the data, so a
target stopped with SIGSTOP holds the initiator's WRITE in flight for as long as it is
stopped; over cma the initiator copies inside ``transfer()`` and a WRITE is never in flight.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

import torch
from kvhandoff.engine import BlockPool
from kvhandoff.engine.transports import (
    HandleState,
    NixlTransport,
    TransportHandle,
    block_regions,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _launch import rank_main

LIMIT_S = 30.0  # any wait below gives up (and fails the rank) after this long
BIG = 64 << 20  # large enough that a tcp WRITE cannot sit whole in socket buffers


def until(condition: Callable[[], bool], what: str, limit_s: float = LIMIT_S) -> None:
    """Spin on ``condition`` (which polls the transport) until it holds; fail past the limit."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {limit_s}s")
        time.sleep(1e-4)  # back off between polls: two cores, several ranks


def finish(transport: NixlTransport, handle: TransportHandle, what: str) -> HandleState:
    until(lambda: transport.poll() is not None and handle.final, what)
    return handle.state


class Mail:
    """Control messages from one peer, in order, read through the transport."""

    def __init__(self, transport: NixlTransport, peer: int) -> None:
        self.transport = transport
        self.peer = peer
        self.box: list[bytes] = []

    def expect(self, prefix: bytes) -> bytes:
        def arrived() -> bool:
            self.transport.poll()
            self.box += [m for src, m in self.transport.recv_control() if src == self.peer]
            return bool(self.box)
        until(arrived, f"control {prefix!r} from rank {self.peer}")
        message = self.box.pop(0)
        assert message.startswith(prefix), (message[:40], prefix)
        return message[len(prefix):]


def connect(rank: int, world: int, folder: str, **kwargs: object) -> NixlTransport:
    return NixlTransport.rendezvous(folder, rank, world, timeout_s=LIMIT_S, **kwargs)  # type: ignore[arg-type]


def goodbye(transport: NixlTransport, mail: Mail) -> None:
    """Nobody leaves while its peer may still need it."""
    transport.send_control(mail.peer, b"bye")
    mail.expect(b"bye")


def pattern(seed: int, layers: int = 8, blocks: int = 64) -> list[torch.Tensor]:
    """A sender's pool content, reproducible by the receiver for checking."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn((blocks, 4, 2, 16), generator=generator).to(torch.float16)
            for _ in range(layers)]


# -- byte-verified transfers, layer-wise, TP=2 -------------------------------------------------

SEND_IDS = [5, 6, 7, 20, 3, 40, 41]
LAYER_SEND_IDS = [[1, 2], [9], [30, 31, 32], [8, 0]]


def transfers(rank: int, world: int, folder: str) -> None:
    """world 4: ranks 0 and 1 (a TP=2 prefill group) send to ranks 2 and 3 (TP=2 decode)."""
    assert world == 4
    transport = connect(rank, world, folder)
    peer = rank + 2 if rank < 2 else rank - 2
    mail = Mail(transport, peer)
    if rank < 2:
        layers = pattern(rank)
        transport.register(layers)  # up front, as an engine would for its pool
        # Whole request: every layer's blocks in one WRITE, into other ids on the peer.
        mail.expect(b"ready")
        first = transport.post_send_regions(block_regions(layers, SEND_IDS), peer, 1)
        # Layer-wise: one WRITE per layer tensor, posted in the reverse of the peer's order.
        handles = [transport.post_send_regions(block_regions([layers[i]], LAYER_SEND_IDS[i % 4]),
                                               peer, 100 + i)
                   for i in reversed(range(len(layers)))]
        # A plain buffer into the peer's blocks, and a size mismatch.
        buffer = torch.arange(7 * 256 * 8 // 2, dtype=torch.int16).view(torch.float16)
        mixed = transport.post_send(buffer, peer, 7)
        wrong = transport.post_send(torch.zeros(1000, dtype=torch.uint8), peer, 8)
        for handle in [first, *handles, mixed]:
            assert finish(transport, handle, "a send") is HandleState.DONE, handle
        assert finish(transport, wrong, "the mismatched send") is HandleState.FAILED
        assert "size mismatch" in (wrong.error or ""), wrong.error
        transport.send_control(peer, b"x" * 4096)  # the largest control message
    else:
        expected = pattern(rank - 2)
        pool = BlockPool(64, 4, 4, 2, 16, dtype=torch.float16, debug=True)
        ids = pool.alloc(len(SEND_IDS), owner="req")
        whole = transport.post_recv_regions(block_regions(pool.layers, ids), peer, 1)
        layer_ids = [pool.alloc(len(LAYER_SEND_IDS[i % 4]), owner="req") for i in range(8)]
        per_layer = [transport.post_recv_regions(block_regions([pool.layers[i]], layer_ids[i]),
                                                 peer, 100 + i) for i in range(8)]
        mixed_ids = pool.alloc(7, owner="req")
        mixed = transport.post_recv_regions(block_regions(pool.layers, mixed_ids), peer, 7)
        wrong_ids = pool.alloc(1, owner="req")
        wrong = transport.post_recv_regions(block_regions(pool.layers[:1], wrong_ids), peer, 8)
        transport.send_control(peer, b"ready")
        for handle in [whole, *per_layer, mixed]:
            assert finish(transport, handle, "a receive") is HandleState.DONE, handle
        for layer, got in zip(expected, pool.layers, strict=True):
            assert torch.equal(got[ids].view(torch.int16), layer[SEND_IDS].view(torch.int16))
        for i in range(8):
            want = expected[i][LAYER_SEND_IDS[i % 4]]
            assert torch.equal(pool.layers[i][layer_ids[i]].view(torch.int16),
                               want.view(torch.int16)), i
        packed = torch.cat([t[mixed_ids].reshape(-1) for t in pool.layers]).view(torch.int16)
        assert torch.equal(packed, torch.arange(packed.numel(), dtype=torch.int16))
        assert finish(transport, wrong, "the mismatched receive") is HandleState.FAILED
        assert "size mismatch" in (wrong.error or ""), wrong.error
        assert all(pool.layers[0][wrong_ids].isnan().all() for _ in [0]), "mismatch wrote"
        assert mail.expect(b"x") == b"x" * 4095
        # Every final receive releases its blocks; the debug pool poisons them and checks the
        # poison when they are handed out again: no write after final.
        all_ids = ids + [i for chunk in layer_ids for i in chunk] + mixed_ids + wrong_ids
        pool.free(all_ids, owner="req")
        assert transport.pending == 0
        pool.assert_poisoned()
        again = pool.alloc(pool.num_free)
        assert sorted(again) == list(range(64))
    goodbye(transport, mail)
    transport.close()
    assert transport.release_memory()


# -- cancel in ADVERTISED ----------------------------------------------------------------------


def cancel_advertised(rank: int, world: int, folder: str) -> None:
    transport = connect(rank, world, folder)
    peer = 1 - rank
    mail = Mail(transport, peer)
    if rank == 1:  # target
        stale = torch.zeros(1 << 16, dtype=torch.uint8)
        handle = transport.post_recv(stale, peer, 3)
        assert handle.cancel() is False  # a receive is the peer's to write: retract instead
        assert handle.retract() is True
        assert finish(transport, handle, "the retraction") is HandleState.FAILED
        assert handle.error == "cancelled", handle.error
        transport.send_control(peer, b"retracted")
        mail.expect(b"cancelled")  # advertise again only once the orphan send is gone
        fresh = torch.zeros(1 << 16, dtype=torch.uint8)
        second = transport.post_recv(fresh, peer, 3)
        transport.send_control(peer, b"advertised")
        assert finish(transport, second, "the second receive") is HandleState.DONE
        assert bool((fresh == 9).all()) and not bool(stale.any()), "the retracted memory"
    else:
        mail.expect(b"retracted")  # polling here answered the retraction
        source = torch.full((1 << 16,), 9, dtype=torch.uint8)
        orphan = transport.post_send(source, peer, 3)
        transport.poll()
        assert not orphan.final, orphan  # the retracted advertisement matched nothing
        assert orphan.cancel() is True
        assert orphan.state is HandleState.FAILED and orphan.error == "cancelled"
        transport.send_control(peer, b"cancelled")
        mail.expect(b"advertised")
        send = transport.post_send(source, peer, 3)
        assert finish(transport, send, "the second send") is HandleState.DONE
    goodbye(transport, mail)


# -- WRITEs held in flight (UCX_TLS=tcp, the target stopped) ----------------------------------


def _target(rank: int, world: int, folder: str, retract_on: bytes | None) -> None:
    transport = connect(rank, world, folder)
    mail = Mail(transport, 0)
    buffer = torch.zeros(BIG, dtype=torch.uint8)
    handle = transport.post_recv(buffer, 0, 1)
    transport.send_control(0, b"pid" + str(os.getpid()).encode())
    if retract_on is not None:
        mail.expect(retract_on)
        retracted = handle.retract()  # too late: the WRITE is posted, so it must land
        print(f"[rank 1] retract() -> {retracted} ({handle.state.value})", flush=True)
    assert finish(transport, handle, "the receive") is HandleState.DONE, handle
    assert bool((buffer == 7).all())
    goodbye(transport, mail)


def _stop_and_write(transport: NixlTransport, mail: Mail) -> tuple[int, TransportHandle]:
    """Stop the target once its advertisement is here (its pid comes after it), then post
    the WRITE: it stays in flight while the target is stopped."""
    pid = int(mail.expect(b"pid"))
    os.kill(pid, signal.SIGSTOP)
    source = torch.full((BIG,), 7, dtype=torch.uint8)
    send = transport.post_send(source, 1, 1)
    # The caller's deadline passes with the WRITE in flight: the handle stays pending and
    # cancel() refuses, so the source memory stays in use.
    assert send.wait(timeout=0.5) is HandleState.PENDING
    assert send.cancel() is False
    transport.poll()
    assert not send.final and transport.pending == 1, send
    return pid, send


def stuck(rank: int, world: int, folder: str) -> None:
    """A stuck WRITE past its deadline, cancel refused on the sender, a late retract on the
    receiver: both end DONE with every byte in place once the target runs again."""
    if rank == 1:
        _target(rank, world, folder, retract_on=b"posted")
        return
    transport = connect(rank, world, folder)
    mail = Mail(transport, 1)
    pid, send = _stop_and_write(transport, mail)
    transport.send_control(1, b"posted")
    os.kill(pid, signal.SIGCONT)
    assert finish(transport, send, "the stuck send") is HandleState.DONE, send
    goodbye(transport, mail)


def target_killed(rank: int, world: int, folder: str) -> None:
    """The target is SIGKILLed while a WRITE to it is in flight: the send fails (peer lost)
    only when NIXL reports the request failed."""
    if rank == 1:
        _target(rank, world, folder, retract_on=None)  # killed by rank 0 before it ends
        raise AssertionError("the target should have been killed")
    transport = connect(rank, world, folder)
    mail = Mail(transport, 1)
    pid, send = _stop_and_write(transport, mail)
    os.kill(pid, signal.SIGKILL)
    assert finish(transport, send, "the send to a dead target") is HandleState.FAILED
    assert "lost" in (send.error or ""), send.error
    assert transport.peer_lost(1) is not None
    after = transport.post_send(torch.zeros(16, dtype=torch.uint8), 1, 2)
    assert after.state is HandleState.FAILED and "lost" in (after.error or "")


def initiator_killed(rank: int, world: int, folder: str) -> None:
    """The initiator dies with its WRITE in flight: the target learns nothing from NIXL; its
    probes find the peer lost, its receive stays pending (blocks pinned) for the fencing
    grace, then fails; the debug pool shows nothing wrote the blocks after that."""
    if rank == 0:
        transport = connect(rank, world, folder)
        mail = Mail(transport, 1)
        pid = int(mail.expect(b"pid"))
        os.kill(pid, signal.SIGSTOP)
        source = torch.full((BIG // 2,), 7, dtype=torch.uint8)
        send = transport.post_send_regions(block_regions([source.view(-1, 1 << 12)],
                                                         range(BIG // 2 >> 12)), 1, 1)
        assert not send.final, send
        os.kill(pid, signal.SIGCONT)
        os.kill(os.getpid(), signal.SIGKILL)  # mid-transfer, no goodbye
    transport = connect(rank, world, folder, probe_interval_s=0.05, fence_grace_s=0.5)
    num_blocks = BIG // 2 >> 12
    pool = BlockPool(num_blocks + 8, 1, 8, 8, 32, dtype=torch.float16, debug=True)  # 4 KiB
    ids = pool.alloc(num_blocks, owner="req")
    pool.pin(ids, owner="transfer")
    handle = transport.post_recv_regions(block_regions(pool.layers[:1], ids), 0, 1)
    transport.send_control(0, b"pid" + str(os.getpid()).encode())
    until(lambda: transport.poll() is not None and transport.peer_lost(0) is not None,
          "the probe to find the initiator lost")
    assert not handle.final, handle  # the fencing grace: the peer may still be writing
    pool.free(ids, owner="req")  # the request gives the blocks up: deferred, still pinned
    assert pool.num_deferred == num_blocks
    assert finish(transport, handle, "the fenced receive") is HandleState.FAILED
    assert "lost" in (handle.error or ""), handle.error
    pool.unpin(ids, owner="transfer")  # final: now they may be reused (and are poisoned)
    transport.poll()
    pool.assert_poisoned(ids)
    again = pool.alloc(num_blocks + 8)  # alloc verifies the poison of every block it hands
    assert len(again) == num_blocks + 8


if __name__ == "__main__":
    rank_main({"transfers": transfers, "cancel_advertised": cancel_advertised, "stuck": stuck,
               "target_killed": target_killed, "initiator_killed": initiator_killed})
