"""Engine transfers between two debug pools on one device, over loopback: byte-verified
(whole and layer-wise), and a stuck operation that is cancelled while the host frees its
blocks, after which the freed blocks' poison stays intact. Each test runs on the CPU (always)
and on CUDA (marked ``cuda``, skipped without a GPU), so the CPU run checks the test itself
and ``pytest -m cuda`` / ``make gpu-check`` runs it on CUDA pools."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import pytest
import torch
from engine_support import HeldTransport, fast_config, running, ticks, token_slots, until
from kvhandoff.engine import BlockPool, KVLayout, TransferCancelled, TransferEngine
from kvhandoff.engine.transports import Fault, FaultyTransport, Transport, loopback_group
from kvhandoff.sessions import CancelResult, State

pytestmark = pytest.mark.anyio

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ]),
]


def debug_pool(device: str, num_blocks: int = 64) -> BlockPool:
    """A debug pool (freed blocks poisoned with NaN) of realistic block geometry on CUDA
    (32 layers, 16 tokens x 8 heads x 128 dims, bf16), a small one on the CPU."""
    if device == "cuda":
        return BlockPool(num_blocks, 32, 16, 8, 128, dtype=torch.bfloat16, device="cuda",
                         debug=True)
    return BlockPool(num_blocks, 4, 4, 2, 8, dtype=torch.bfloat16, device="cpu", debug=True)


def fill_random(pool: BlockPool, block_ids: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Write random (finite) values into ``block_ids`` of every layer, made on the CPU and
    copied to the pool's device; returns the bytes written, per layer, on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.tensor(list(block_ids), device=pool.device)
    written = []
    for layer in pool.layers:
        values = torch.randn((len(block_ids), *layer.shape[1:]), generator=generator)
        layer.index_copy_(0, index, values.to(layer.dtype).to(pool.device))
        written.append(values.to(layer.dtype).view(torch.uint8))
    return written


def bytes_of(pool: BlockPool, block_ids: Sequence[int]) -> list[torch.Tensor]:
    index = torch.tensor(list(block_ids), device=pool.device)
    return [layer.index_select(0, index).view(torch.uint8).cpu() for layer in pool.layers]


def same_bytes(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def engines(device: str, wrap0: partial[Transport] | None = None,
            wrap1: partial[Transport] | None = None) -> tuple[TransferEngine, TransferEngine]:
    t0, t1 = loopback_group(2)
    e0 = TransferEngine(debug_pool(device), wrap0(t0) if wrap0 else t0, config=fast_config())
    e1 = TransferEngine(debug_pool(device), wrap1(t1) if wrap1 else t1, config=fast_config())
    return e0, e1


@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layerwise"])
@pytest.mark.parametrize("device", DEVICES)
async def test_gpu_engine_transfer_moves_bytes_between_pools(device: str,
                                                             layerwise: bool) -> None:
    e0, e1 = engines(device)
    p0, p1 = e0.pool, e1.pool
    async with running(e0, e1):
        src = p0.alloc(37, owner="r")
        dst = p1.alloc(37, owner="r")
        # Out of order on both sides: the gather and the scatter follow the block tables.
        src, dst = src[::-1], dst[3:] + dst[:3]
        expected = fill_random(p0, src, seed=1)
        hs = e0.send("r", src, 1, layerwise=layerwise)
        hr = e1.receive("r", dst, 0, layerwise=layerwise)
        for layer in range(p0.num_layers if layerwise else 0):
            hs.layer_ready(layer)
        sent, got = await hs.wait(), await hr.wait()
        assert sent.nbytes == got.nbytes == 37 * p0.block_nbytes
        assert same_bytes(bytes_of(p1, dst), expected)
        p1.assert_poisoned()  # the scatter wrote no block outside the transfer's own
        await until(lambda: not p0.pinned_by("r"))
        p0.free(src, owner="r")
        p1.free(dst, owner="r")
        p0.assert_poisoned(src)
    p0.check()
    p1.check()
    assert p0.num_free == p0.num_blocks and p1.num_free == p1.num_blocks


@pytest.mark.parametrize("device", DEVICES)
async def test_gpu_engine_cancelled_stuck_transfer_keeps_freed_poison(device: str) -> None:
    # The receive never finishes until cancelled; the send is held in the transport.
    e0, e1 = engines(device, wrap0=partial(HeldTransport, held=[0]),
                     wrap1=partial(FaultyTransport, seed=0, faults={0: Fault.STUCK}))
    p0, p1, h0 = e0.pool, e1.pool, e0.transport
    assert isinstance(h0, HeldTransport)
    async with running(e0, e1):
        src, dst = p0.alloc(5, owner="x"), p1.alloc(5, owner="x")
        fill_random(p0, src, seed=2)
        hs, hr = e0.send("x", src, 1), e1.receive("x", dst, 0)
        await until(lambda: e0.session("x").state is State.IN_FLIGHT)
        result = e1.cancel("x")
        assert result is CancelResult.CANCEL_REQUESTED_IN_FLIGHT and not result.safe_to_free
        with pytest.raises(TransferCancelled):
            await hr.wait()
        with pytest.raises(TransferCancelled):
            await hs.wait()
        # The host frees during the transfer: both frees are deferred, nothing is reused.
        p0.free(src, owner="x")
        p1.free(dst, owner="x")
        await ticks(e0, e1)  # many chances to release them early
        assert p0.num_deferred == 5 and p0.pinned_by("x") == frozenset(src)
        h0.release(0)  # the wedged send ends now
        await until(lambda: p0.num_deferred == 0 and p1.num_deferred == 0)
        await ticks(e0, e1)  # many chances for a late write into the freed blocks
        p0.assert_poisoned(src)
        p1.assert_poisoned(dst)
        p0.assert_poisoned()
        p1.assert_poisoned()
        # Handed out again, the blocks pass the pool's own poison check on alloc.
        again = p1.alloc(p1.num_blocks, owner="again")
        assert set(dst) <= set(again)
        p1.free(again, owner="again")
    p0.check()
    p1.check()


REGION, STAGED = 0, 1 << 62  # EngineConfig.region_min_bytes for each path


@pytest.mark.parametrize("order", ["NHD", "HND"])
@pytest.mark.parametrize(("sender_path", "receiver_path"),
                         [(REGION, STAGED), (STAGED, REGION), (STAGED, STAGED)],
                         ids=["region-to-staged", "staged-to-region", "staged-to-staged"])
@pytest.mark.parametrize("device", DEVICES)
async def test_gpu_engine_partial_last_block_moves_only_its_valid_slots(
        device: str, sender_path: int, receiver_path: int, order: str) -> None:
    """A count that leaves the last block partly empty: the staged side's last piece is a
    region copy on the device (the kernels for the whole blocks), the region side's last
    regions are cut; only the valid slots land, the others keep their bytes, and the two
    checksums agree."""
    geometry = ((32, 16, 8, 128) if device == "cuda" else (4, 4, 2, 8))
    layout = KVLayout(*geometry, torch.bfloat16, order=order)  # type: ignore[arg-type]
    p0, p1 = (BlockPool.from_layout(layout, 64, device=device, debug=True) for _ in range(2))
    t0, t1 = loopback_group(2)
    e0 = TransferEngine(p0, t0, config=fast_config(region_min_bytes=sender_path,
                                                   checksum=True))
    e1 = TransferEngine(p1, t1, config=fast_config(region_min_bytes=receiver_path,
                                                   checksum=True))
    tokens = 36 * layout.block_tokens + 3  # 37 blocks, the last holding 3 tokens
    async with running(e0, e1):
        src, dst = p0.alloc(37, owner="p"), p1.alloc(37, owner="p")
        src, dst = src[::-1], dst[3:] + dst[:3]
        fill_random(p0, src, seed=3)
        fill_random(p1, dst, seed=4)
        _, untouched = token_slots(p1, dst, tokens)
        hs = e0.send("p", src, 1, num_tokens=tokens)
        hr = e1.receive("p", dst, 0, num_tokens=tokens)
        sent, got = await hs.wait(), await hr.wait()
        kept, past = token_slots(p1, dst, tokens)
        assert same_bytes(kept, token_slots(p0, src, tokens)[0])
        assert same_bytes(past, untouched)
        row = layout.kv_heads * layout.head_dim * 2  # one token of one tensor, bf16
        assert sent.nbytes == got.nbytes == tokens * row * len(p0.layers)
        p1.assert_poisoned()  # nothing written outside the transfer's blocks
        await until(lambda: not p0.pinned_by("p") and not p1.pinned_by("p"))
        p0.free(src, owner="p")
        p1.free(dst, owner="p")
