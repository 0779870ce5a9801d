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


# -- the region form: block to block in one pass ------------------------------------------


@pytest.fixture(params=["torch", "cpp"])
def copy_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The block copy backend loopback's region copies run on: the torch reference, or the
    compiled extension (required)."""
    import os
    import shutil

    from kvhandoff import cuda_ext
    from torch.utils.cpp_extension import is_ninja_available

    if request.param == "cpp" and (
            shutil.which(os.environ.get("CXX", "c++")) is None or not is_ninja_available()):
        pytest.skip("no C++ compiler or ninja: the compiled backend cannot be built here")
    monkeypatch.setenv(cuda_ext.BACKEND_ENV, request.param)
    assert cuda_ext.backend("cpu") == request.param
    return str(request.param)


def _pool(num_blocks: int, count: int, seed: int, dtype: torch.dtype = torch.bfloat16,
          ) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((num_blocks, 4, 3, 5), generator=gen).to(dtype) for _ in range(count)]


def _bytes(layers: list[torch.Tensor]) -> list[torch.Tensor]:
    return [layer.view(torch.uint8).clone() for layer in layers]


def test_loopback_says_it_moves_regions() -> None:
    a, _ = LoopbackTransport.pair()
    assert a.moves_regions is True


@pytest.mark.parametrize("recv_first", [False, True])
@pytest.mark.parametrize(("src_ids", "dst_ids"), [
    ([3, 4, 5, 6, 0], [9, 1, 7, 2, 8]),  # a run on the sender, scattered on the receiver
    ([11, 2, 7], [4, 5, 6]),  # the other way round: the two sides cut the stream elsewhere
    (list(range(12)), list(range(14))[2:]),  # one region per tensor on both sides
])
def test_loopback_region_send_to_region_recv_copies_block_to_block(
        copy_backend: str, recv_first: bool, src_ids: list[int], dst_ids: list[int]) -> None:
    from kvhandoff import cuda_ext
    from kvhandoff.engine.transports import block_regions

    a, b = LoopbackTransport.pair()
    source = _pool(12, 6, seed=1)
    target = _pool(14, 6, seed=2)
    expected = [t.clone() for t in target]
    cuda_ext.copy_blocks_ref(source, src_ids, expected, dst_ids)
    before = _bytes(source)
    send_regions, recv_regions = block_regions(source, src_ids), block_regions(target, dst_ids)
    if recv_first:
        recv = b.post_recv_regions(recv_regions, 0, 3)
        send = a.post_send_regions(send_regions, 1, 3)
    else:
        send = a.post_send_regions(send_regions, 1, 3)
        assert send.test() is HandleState.PENDING
        recv = b.post_recv_regions(recv_regions, 0, 3)
    assert send.test() is HandleState.DONE and recv.test() is HandleState.DONE
    assert send.nbytes == recv.nbytes == send_regions.nbytes
    for got, want in zip(target, expected, strict=True):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # others untouched
    assert all(torch.equal(s.view(torch.uint8), b) for s, b in zip(source, before, strict=True))
    assert a.poll() == [send] and b.poll() == [recv]


def test_loopback_regions_and_buffers_carry_the_same_stream(copy_backend: str) -> None:
    """A region send fills a buffer receive with the packed bytes gather would make, and a
    buffer send scatters into region receives exactly as scatter does."""
    from kvhandoff import cuda_ext
    from kvhandoff.engine.transports import block_regions

    a, b = LoopbackTransport.pair()
    source = _pool(10, 4, seed=3, dtype=torch.float16)
    ids = [7, 0, 1, 2, 9]
    nbytes = cuda_ext.packed_nbytes(source, len(ids))
    packed = cuda_ext.gather_ref(source, ids, torch.empty(nbytes, dtype=torch.uint8))
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    b.post_recv(buf, 0, 1)
    a.post_send_regions(block_regions(source, ids), 1, 1)
    assert torch.equal(buf, packed)

    target = _pool(10, 4, seed=4, dtype=torch.float16)
    expected = [t.clone() for t in target]
    cuda_ext.scatter_ref(packed, expected, [5, 6, 8, 3, 4])
    recv = b.post_recv_regions(block_regions(target, [5, 6, 8, 3, 4]), 0, 2)
    send = a.post_send(packed, 1, 2)
    assert recv.test() is HandleState.DONE and send.test() is HandleState.DONE
    for got, want in zip(target, expected, strict=True):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_loopback_regions_of_split_parts_match_one_by_one(copy_backend: str) -> None:
    """A message moved as several equal parts (``Regions.split``, regions cut mid-block) on
    one side only still lands byte for byte."""
    from kvhandoff import cuda_ext
    from kvhandoff.engine.transports import block_regions

    a, b = LoopbackTransport.pair()
    source = _pool(8, 3, seed=5)
    target = _pool(8, 3, seed=6)
    expected = [t.clone() for t in target]
    cuda_ext.copy_blocks_ref(source, [1, 2, 5], expected, [0, 6, 7])
    send_parts = block_regions(source, [1, 2, 5]).split(3)
    packed_parts = torch.zeros(send_parts[0].nbytes * 3, dtype=torch.uint8).chunk(3)
    recv_parts = block_regions(target, [0, 6, 7]).split(3)
    for k in range(3):
        b.post_recv_regions(recv_parts[k], 0, 10 + k)
        a.post_send_regions(send_parts[k], 1, 10 + k)
    for got, want in zip(target, expected, strict=True):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert all(p.sum() == 0 for p in packed_parts)


def test_loopback_region_size_mismatch_fails_both_and_writes_nothing(copy_backend: str) -> None:
    from kvhandoff.engine.transports import block_regions

    a, b = LoopbackTransport.pair()
    source, target = _pool(6, 2, seed=7), _pool(6, 2, seed=8)
    before = _bytes(target)
    recv = b.post_recv_regions(block_regions(target, [0, 1]), 0, 4)
    send = a.post_send_regions(block_regions(source, [0, 1, 2]), 1, 4)
    assert send.state is HandleState.FAILED and recv.state is HandleState.FAILED
    assert recv.error is not None and "size mismatch" in recv.error
    assert all(torch.equal(t.view(torch.uint8), b) for t, b in zip(target, before, strict=True))


def test_loopback_overlapping_regions_fail_both_and_write_nothing(copy_backend: str) -> None:
    """Two ranks sharing one pool, the receive naming a block the send reads: refused by the
    copy's checks before any byte moves."""
    from kvhandoff.engine.transports import block_regions

    a, b = LoopbackTransport.pair()
    pool = _pool(6, 2, seed=9)
    before = _bytes(pool)
    recv = b.post_recv_regions(block_regions(pool, [3, 4]), 0, 5)
    send = a.post_send_regions(block_regions(pool, [1, 3]), 1, 5)
    assert send.state is HandleState.FAILED and recv.state is HandleState.FAILED
    assert send.error is not None and "overlap" in send.error
    assert all(torch.equal(t.view(torch.uint8), b) for t, b in zip(pool, before, strict=True))


def test_loopback_region_posts_check_their_arguments_first() -> None:
    from kvhandoff.engine.transports import block_regions

    a, b = LoopbackTransport.pair()
    layers = _pool(4, 2, seed=10)
    regions = block_regions(layers, [0])
    with pytest.raises(InvalidBufferError, match="Regions"):
        a.post_send_regions(torch.zeros(4), 1, 1)  # type: ignore[arg-type]
    with pytest.raises(InvalidBufferError, match="out of range"):
        block_regions(layers, [4])
    with pytest.raises(PeerUnknownError):
        a.post_send_regions(regions, 0, 1)
    with pytest.raises(InvalidTagError):
        b.post_recv_regions(regions, 0, 0)
    a.close()
    with pytest.raises(TransportClosedError):
        a.post_send_regions(regions, 1, 1)
    assert a.poll() == [] and b.poll() == []


def test_loopback_region_ops_cancel_and_close_like_buffer_ops() -> None:
    from kvhandoff.engine.transports import block_regions

    a, b = LoopbackTransport.pair()
    target = _pool(4, 2, seed=11)
    before = _bytes(target)
    recv = b.post_recv_regions(block_regions(target, [1, 2]), 0, 6)
    assert recv.cancel() is True
    assert recv.state is HandleState.FAILED and recv.error == "cancelled"
    pending = b.post_recv_regions(block_regions(target, [1, 2]), 0, 7)
    a.close()
    assert pending.state is HandleState.FAILED and pending.error == "peer 0 closed"
    assert all(torch.equal(t.view(torch.uint8), b) for t, b in zip(target, before, strict=True))
