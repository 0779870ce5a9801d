"""The transformers adapter against a real model: a tiny random-initialised Llama (built from
a config in code, nothing downloaded) prefills, its DynamicCache goes into blocks (directly,
per TP shard, or across a real engine transfer) and comes back as a new DynamicCache;
decoding on from it gives exactly the tokens and logits of decoding on from the model's own
cache, and a corrupted block does not (the negative control)."""

from __future__ import annotations

import pytest
import torch
from kvhandoff.engine import BlockPool, KVLayout, TransferEngine
from kvhandoff.engine.transports import loopback_group
from kvhandoff.kvcache import (
    KVDtypeError,
    blocks_for_tokens,
    read_cache,
    read_dynamic_cache,
    write_dynamic_cache,
)

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

PROMPT, STEPS, BT = 21, 6, 8


@pytest.fixture(scope="module")
def model() -> object:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
        # Large weights: a slightly wrong cache changes the next tokens, not just a logit.
        initializer_range=0.5)
    return transformers.LlamaForCausalLM(config).eval()


def prefill(model: object) -> tuple[torch.Tensor, object]:
    prompt = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(prompt, use_cache=True)  # type: ignore[operator]
    return out.logits[:, -1:].argmax(-1), out.past_key_values


def decode(model: object, cache: object, token: torch.Tensor,
           steps: int = STEPS) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding on from ``cache`` (which it extends): the tokens and every logit."""
    tokens, logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)  # type: ignore[operator]
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(int(token))
    return tokens, torch.stack(logits)


def layout_of(model: object, order: str = "NHD", **kw: object) -> KVLayout:
    config = model.config  # type: ignore[attr-defined]
    head_dim = config.hidden_size // config.num_attention_heads
    return KVLayout(config.num_hidden_layers, BT, config.num_key_value_heads, head_dim,
                    torch.float32, order, **kw)


@pytest.mark.parametrize("order", ["NHD", "HND"])
def test_hf_cache_round_trip_decodes_identically(model: object, order: str) -> None:
    token, cache = prefill(model)
    pool = BlockPool.from_layout(layout_of(model, order), 16)
    table = [9, 3, 12]
    assert len(table) == blocks_for_tokens(PROMPT, pool)
    assert write_dynamic_cache(pool, cache, table) == PROMPT
    restored = read_dynamic_cache(pool, table, PROMPT, config=model.config)  # type: ignore[attr-defined]
    assert restored.get_seq_length() == PROMPT
    for ours, theirs in zip(restored.layers, cache.layers, strict=True):  # type: ignore[attr-defined]
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    want_tokens, want_logits = decode(model, cache, token)
    got_tokens, got_logits = decode(model, restored, token)
    assert got_tokens == want_tokens and torch.equal(got_logits, want_logits)

    # The negative control: one corrupted block (layer 0's K, the prompt's second block).
    pool.key(0)[table[1]] += 1.0
    corrupted = read_dynamic_cache(pool, table, PROMPT)
    bad_tokens, bad_logits = decode(model, corrupted, token)
    assert not torch.allclose(bad_logits, want_logits)
    assert bad_tokens != want_tokens


def test_hf_append_after_decode_writes_only_the_new_tokens(model: object) -> None:
    token, cache = prefill(model)
    pool = BlockPool.from_layout(layout_of(model), 16)
    table = [0, 5, 6, 2]  # room for the prompt and the decoded tokens
    write_dynamic_cache(pool, cache, table)
    prompt_blocks = [layer[table[:2]].clone() for layer in pool.layers]
    decode(model, cache, token, steps=4)  # the model's cache grows to PROMPT + 4
    assert write_dynamic_cache(pool, cache, table, start=PROMPT) == PROMPT + 4
    # The first two blocks (tokens 0..15, all prompt) were not rewritten.
    assert all(torch.equal(layer[table[:2]], before)
               for layer, before in zip(pool.layers, prompt_blocks, strict=True))
    kv = read_cache(pool, table, PROMPT + 4)
    for (k, v), layer in zip(kv, cache.layers, strict=True):  # type: ignore[attr-defined]
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)


def test_hf_tp_shards_reassemble_and_decode_identically(model: object) -> None:
    token, cache = prefill(model)
    table = [1, 2, 3]
    # Two TP ranks with one of the model's two KV heads each (HND blocks).
    shard_layout = layout_of(model, "HND", tp_size=2)
    shards = [BlockPool.from_layout(KVLayout(
        **shard_layout.describe() | {"dtype": torch.float32, "kv_heads": 1, "tp_rank": rank}),
        8) for rank in range(2)]
    for shard in shards:
        write_dynamic_cache(shard, cache, table)  # each its own head of the two
    parts = [read_cache(shard, table, PROMPT) for shard in shards]
    whole = transformers.DynamicCache(config=model.config)  # type: ignore[attr-defined]
    for layer in range(2):
        whole.update(torch.cat([p[layer][0] for p in parts], dim=1),
                     torch.cat([p[layer][1] for p in parts], dim=1), layer)
    want = decode(model, cache, token)
    got = decode(model, whole, token)
    assert got[0] == want[0] and torch.equal(got[1], want[1])


@pytest.mark.anyio
async def test_hf_cache_across_an_engine_transfer_decodes_identically(model: object) -> None:
    """Prefill on one rank into a vLLM-layout pool adopted from the host's tensors, move the
    blocks with the engine, decode on from the receiving rank's blocks."""
    from engine_support import fast_config, running

    token, cache = prefill(model)
    layout = layout_of(model)
    host = [torch.zeros(2, 8, *layout.block_shape) for _ in range(layout.num_layers)]
    p0 = BlockPool.from_tensors(host, layout=layout)
    p1 = BlockPool.from_layout(layout, 8)
    t0, t1 = loopback_group(2)
    e0, e1 = TransferEngine(p0, t0, config=fast_config()), TransferEngine(p1, t1,
                                                                        config=fast_config())
    async with running(e0, e1):
        src = p0.alloc(blocks_for_tokens(PROMPT, p0), owner="r")
        dst = p1.alloc(len(src), owner="r")
        write_dynamic_cache(p0, cache, src)
        # The prompt's own count (its last block is partly filled) and the host's metadata.
        hs = e0.send("r", src, 1, num_tokens=PROMPT, metadata=b"prompt=21;first=%d" % int(token))
        hr = e1.receive("r", dst, 0, num_tokens=PROMPT)
        await hs.wait()
        result = await hr.wait()
        assert result.num_tokens == PROMPT
        assert result.metadata == b"prompt=21;first=%d" % int(token)
        restored = read_dynamic_cache(p1, dst, result.num_tokens)
        p0.free(src, owner="r")
        p1.free(dst, owner="r")
    want = decode(model, cache, token)
    got = decode(model, restored, token)
    assert got[0] == want[0] and torch.equal(got[1], want[1])


def test_hf_bf16_model_cache_refused_by_a_float16_pool(model: object) -> None:
    _, cache = prefill(model)
    for layer in cache.layers:  # type: ignore[attr-defined]
        layer.keys, layer.values = layer.keys.bfloat16(), layer.values.bfloat16()
    pool = BlockPool(8, 2, BT, 2, 16)  # dtype left at its float16 default
    with pytest.raises(KVDtypeError):
        write_dynamic_cache(pool, cache, [0, 1, 2])
    assert not any(layer.any() for layer in pool.layers)


def test_hf_bf16_model_round_trip_through_a_bf16_pool(model: object) -> None:
    """The model in bfloat16 and a pool whose dtype comes from the layout: bytes are moved,
    never converted, so decoding on is bit-identical."""
    import copy

    bf16 = copy.deepcopy(model).to(torch.bfloat16)  # type: ignore[attr-defined]
    token, cache = prefill(bf16)
    assert cache.layers[0].keys.dtype == torch.bfloat16  # type: ignore[attr-defined]
    layout = KVLayout(**layout_of(model).describe() | {"dtype": torch.bfloat16})
    pool = BlockPool.from_layout(layout, 8)
    write_dynamic_cache(pool, cache, [6, 0, 3])
    restored = read_dynamic_cache(pool, [6, 0, 3], PROMPT)
    want = decode(bf16, cache, token)
    got = decode(bf16, restored, token)
    assert got[0] == want[0] and torch.equal(got[1], want[1])
