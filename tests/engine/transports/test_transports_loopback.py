"""LoopbackTransport: matching, ordering, cancel, close, the control channel, argument
checks, and the package's exported names."""

from __future__ import annotations

import threading

import kvhandoff.engine.transports as transports
import pytest
import torch
from kvhandoff.engine.transports import (
    MAX_CONTROL_BYTES,
    ControlMessageTooLargeError,
    HandleKind,
    HandleState,
    InvalidBufferError,
    InvalidTagError,
    LoopbackTransport,
    PeerUnknownError,
    TransportClosedError,
    TransportHandle,
    loopback_group,
)


def _pattern(nbytes: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)


def test_transports_all_matches_exports() -> None:
    exported = {name for name in vars(transports) if not name.startswith("_")}
    modules = {"errors", "annotations"}
    assert set(transports.__all__) == exported - modules
    for name in transports.__all__:
        assert getattr(transports, name) is not None


def test_transports_import_does_not_load_mpi() -> None:
    import subprocess
    import sys

    code = "import sys, kvhandoff.engine.transports; print('mpi4py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_loopback_send_then_recv_moves_bytes() -> None:
    a, b = LoopbackTransport.pair()
    src = torch.randn(64, 16)
    dst = torch.zeros(64 * 16 * 2, dtype=torch.bfloat16)  # other dtype, same byte size
    send = a.post_send(src, 1, 7)
    assert send.test() is HandleState.PENDING
    recv = b.post_recv(dst, 0, 7)
    assert send.test() is HandleState.DONE and recv.test() is HandleState.DONE
    assert torch.equal(dst.view(torch.uint8), src.view(-1).view(torch.uint8))
    assert (send.kind, send.peer, send.tag, send.nbytes) == (HandleKind.SEND, 1, 7, 4096)
    assert (recv.kind, recv.peer, recv.nbytes, recv.error) == (HandleKind.RECV, 0, 4096, None)


def test_loopback_recv_then_send_moves_bytes() -> None:
    a, b = LoopbackTransport.pair()
    dst = torch.zeros(100, dtype=torch.uint8)
    recv = b.post_recv(dst, 0, 3)
    assert b.poll() == []
    a.post_send(_pattern(100, 1), 1, 3)
    assert b.poll() == [recv]
    assert torch.equal(dst, _pattern(100, 1))


def test_loopback_poll_reports_each_handle_once() -> None:
    a, b = LoopbackTransport.pair()
    sends = [a.post_send(_pattern(8, i), 1, i + 1) for i in range(5)]
    recvs = [b.post_recv(torch.zeros(8, dtype=torch.uint8), 0, i + 1) for i in range(5)]
    assert recvs[0].test() is HandleState.DONE  # observed by test() first, still polled once
    assert a.poll() == sends
    assert b.poll() == recvs
    assert a.poll() == [] and b.poll() == []


def test_loopback_token_travels_with_handle() -> None:
    a, b = LoopbackTransport.pair()
    handle = b.post_recv(torch.zeros(4, dtype=torch.uint8), 0, 1)
    handle.token = ("req-1", 0)
    a.post_send(_pattern(4, 0), 1, 1)
    (done,) = b.poll()
    assert done.token == ("req-1", 0)


def test_loopback_same_tag_matches_in_post_order() -> None:
    a, b = LoopbackTransport.pair()
    for i in range(4):
        a.post_send(_pattern(32, i), 1, 9)
    outs = [torch.zeros(32, dtype=torch.uint8) for _ in range(4)]
    for out in outs:
        b.post_recv(out, 0, 9)
    for i, out in enumerate(outs):
        assert torch.equal(out, _pattern(32, i))


def test_loopback_tags_do_not_cross() -> None:
    a, b = LoopbackTransport.pair()
    recv = b.post_recv(torch.zeros(8, dtype=torch.uint8), 0, 2)
    send = a.post_send(_pattern(8, 0), 1, 1)
    assert recv.test() is HandleState.PENDING and send.test() is HandleState.PENDING
    other = b.post_recv(torch.zeros(8, dtype=torch.uint8), 0, 1)
    assert other.test() is HandleState.DONE and recv.test() is HandleState.PENDING


def test_loopback_size_mismatch_fails_both_and_writes_nothing() -> None:
    a, b = LoopbackTransport.pair()
    dst = torch.full((16,), 7, dtype=torch.uint8)
    recv = b.post_recv(dst, 0, 1)
    send = a.post_send(_pattern(32, 0), 1, 1)
    assert send.test() is HandleState.FAILED and recv.test() is HandleState.FAILED
    assert recv.error is not None and "size mismatch" in recv.error
    assert torch.equal(dst, torch.full((16,), 7, dtype=torch.uint8))


def test_loopback_cancel_unmatched_recv() -> None:
    a, b = LoopbackTransport.pair()
    dst = torch.zeros(8, dtype=torch.uint8)
    recv = b.post_recv(dst, 0, 4)
    assert b.cancellable and b.cancellable_kinds == frozenset(HandleKind)
    assert recv.cancel() is True
    assert (recv.test(), recv.error) == (HandleState.FAILED, "cancelled")
    assert b.poll() == [recv]
    assert recv.cancel() is False  # already final
    send = a.post_send(_pattern(8, 0), 1, 4)  # the cancelled receive cannot match it
    assert send.test() is HandleState.PENDING
    assert torch.equal(dst, torch.zeros(8, dtype=torch.uint8))
    assert send.cancel() is True and send.test() is HandleState.FAILED


def test_loopback_cancel_after_done_returns_false() -> None:
    a, b = LoopbackTransport.pair()
    send = a.post_send(_pattern(8, 0), 1, 1)
    b.post_recv(torch.zeros(8, dtype=torch.uint8), 0, 1)
    assert send.cancel() is False and send.state is HandleState.DONE


def test_loopback_wait_returns_pending_on_timeout_and_done_when_matched() -> None:
    a, b = LoopbackTransport.pair()
    recv = b.post_recv(torch.zeros(8, dtype=torch.uint8), 0, 1)
    assert recv.wait(0.01) is HandleState.PENDING
    a.post_send(_pattern(8, 0), 1, 1)
    assert recv.wait(None) is HandleState.DONE


def test_loopback_wait_sees_another_thread_post() -> None:
    a, b = LoopbackTransport.pair()
    recv = b.post_recv(torch.zeros(8, dtype=torch.uint8), 0, 1)
    thread = threading.Thread(target=a.post_send, args=(_pattern(8, 3), 1, 1))
    thread.start()
    assert recv.wait(30) is HandleState.DONE
    thread.join()


def test_loopback_group_all_to_all() -> None:
    group = loopback_group(4)
    received: dict[tuple[int, int], torch.Tensor] = {}
    handles: list[TransportHandle] = []
    for me in group:
        for peer in range(4):
            if peer != me.rank:
                handles.append(me.post_send(_pattern(64, 10 * me.rank + peer), peer, 5))
                out = received[(peer, me.rank)] = torch.zeros(64, dtype=torch.uint8)
                handles.append(me.post_recv(out, peer, 5))
    assert all(h.test() is HandleState.DONE for h in handles)
    for (src, dst), out in received.items():
        assert torch.equal(out, _pattern(64, 10 * src + dst))
    assert sum(len(t.poll()) for t in group) == len(handles)


def test_loopback_threads_drive_endpoints_concurrently() -> None:
    a, b = LoopbackTransport.pair()
    count = 200
    outs = [torch.zeros(16, dtype=torch.uint8) for _ in range(count)]
    errors: list[BaseException] = []

    def sender() -> None:
        try:
            for i in range(count):
                a.post_send(_pattern(16, i), 1, 1 + i % 3)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=sender)
    thread.start()
    recvs = [b.post_recv(outs[i], 0, 1 + i % 3) for i in range(count)]
    thread.join()
    assert not errors
    assert all(r.wait(30) is HandleState.DONE for r in recvs)
    assert all(torch.equal(outs[i], _pattern(16, i)) for i in range(count))


def test_loopback_control_messages_both_ways_in_order() -> None:
    group = loopback_group(3)
    group[0].send_control(2, b"first")
    group[1].send_control(2, bytearray(b"from-1"))
    group[0].send_control(2, memoryview(b"second"))
    group[2].send_control(0, b"back")
    assert group[2].recv_control() == [(0, b"first"), (1, b"from-1"), (0, b"second")]
    assert group[2].recv_control() == []
    assert group[0].recv_control() == [(2, b"back")]
    group[1].send_control(0, b"")
    assert group[0].recv_control() == [(1, b"")]


def test_loopback_control_limits() -> None:
    a, _ = LoopbackTransport.pair()
    a.send_control(1, bytes(MAX_CONTROL_BYTES))
    with pytest.raises(ControlMessageTooLargeError) as info:
        a.send_control(1, bytes(MAX_CONTROL_BYTES + 1))
    assert (info.value.size, info.value.limit) == (MAX_CONTROL_BYTES + 1, MAX_CONTROL_BYTES)
    with pytest.raises(TypeError):
        a.send_control(1, "text")  # type: ignore[arg-type]


@pytest.mark.parametrize("peer", [0, 2, -1, "1", 1.0])
def test_loopback_rejects_unknown_peer(peer: object) -> None:
    a, _ = LoopbackTransport.pair()
    with pytest.raises(PeerUnknownError) as info:
        a.post_send(torch.zeros(4), peer, 1)  # type: ignore[arg-type]
    assert info.value.peer == peer
    with pytest.raises(PeerUnknownError):
        a.send_control(peer, b"x")  # type: ignore[arg-type]


@pytest.mark.parametrize("tag", [0, -3, 2**31, True, "5"])
def test_loopback_rejects_bad_tag(tag: object) -> None:
    a, _ = LoopbackTransport.pair()
    with pytest.raises(InvalidTagError) as info:
        a.post_recv(torch.zeros(4), 1, tag)  # type: ignore[arg-type]
    assert info.value.max_tag == a.max_tag


@pytest.mark.parametrize(
    "buf",
    [torch.zeros(4, 4).t(), torch.zeros(0), [1, 2, 3], b"bytes"],
    ids=["non-contiguous", "empty", "list", "bytes"],
)
def test_loopback_rejects_bad_buffer(buf: object) -> None:
    a, _ = LoopbackTransport.pair()
    with pytest.raises(InvalidBufferError):
        a.post_send(buf, 1, 1)  # type: ignore[arg-type]


def test_loopback_close_fails_pending_on_both_sides() -> None:
    a, b = LoopbackTransport.pair()
    mine = a.post_recv(torch.zeros(4, dtype=torch.uint8), 1, 1)
    theirs = b.post_send(_pattern(4, 0), 0, 2)
    a.close()
    a.close()  # idempotent
    assert a.closed
    assert (mine.test(), mine.error) == (HandleState.FAILED, "transport closed")
    assert (theirs.test(), theirs.error) == (HandleState.FAILED, "peer 0 closed")
    assert a.poll() == [mine] and b.poll() == [theirs]
    with pytest.raises(TransportClosedError) as info:
        a.post_send(torch.zeros(4), 1, 1)
    assert info.value.operation == "post_send"
    with pytest.raises(TransportClosedError):
        a.send_control(1, b"x")
    late = b.post_recv(torch.zeros(4, dtype=torch.uint8), 0, 3)
    assert (late.test(), late.error) == (HandleState.FAILED, "peer 0 closed")
    b.send_control(0, b"dropped")  # a closed rank's mail is dropped, like an exited process
    assert a.recv_control() == []


def test_transport_errors_survive_pickling() -> None:
    import pickle

    a, _ = LoopbackTransport.pair()
    with pytest.raises(PeerUnknownError) as info:
        a.post_send(torch.zeros(4), 5, 1)
    copy = pickle.loads(pickle.dumps(info.value))
    assert (type(copy), copy.peer, copy.rank, copy.world_size, str(copy)) == (
        PeerUnknownError, 5, 0, 2, str(info.value)
    )


def test_loopback_group_needs_two_ranks() -> None:
    with pytest.raises(ValueError):
        loopback_group(1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loopback_moves_bytes_between_host_and_device() -> None:
    a, b = LoopbackTransport.pair()
    dst = torch.zeros(4096, dtype=torch.uint8, device="cuda")
    recv = b.post_recv(dst, 0, 1)
    a.post_send(_pattern(4096, 9), 1, 1)
    assert recv.test() is HandleState.DONE
    assert torch.equal(dst.cpu(), _pattern(4096, 9))
