"""The run's plan: the request list and the KV geometry, derived from the command line alone.

Every rank builds the same plan from the same options (no communication), so the request
list must be a pure function of them: the prompt lengths come from ``random.Random(seed)``.
Options that cannot make a run raise ``ValueError`` naming the option; ``kvhandoff demo``
prints it and exits with code 2.
"""

from __future__ import annotations

import argparse
import math
import random

import attrs

WORLD = 4  # two prefill ranks, then two decode ranks
TP = 2

# Options that must be at least 1 (argparse dest names).
_POSITIVE = ("requests", "concurrency", "blocks", "layers", "kv_heads", "head_dim",
             "block_tokens", "min_tokens", "max_tokens", "torch_threads")


@attrs.frozen
class Request:
    """One request of the plan: ``blocks`` KV blocks on every rank, sent layer-wise or not."""

    index: int
    request_id: str
    tokens: int
    blocks: int
    layerwise: bool


@attrs.frozen
class Plan:
    """Everything every rank must agree on, derived from the command line alone."""

    requests: tuple[Request, ...]
    concurrency: int
    seed: int
    num_blocks: int
    layers: int
    kv_heads: int  # per rank (the TP shard)
    head_dim: int
    block_tokens: int
    faults: bool

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block across every layer, K and V."""
        return 2 * self.layers * self.tensor_block_nbytes

    @property
    def tensor_block_nbytes(self) -> int:
        """Bytes of one block of one K or V tensor (bf16)."""
        return self.block_tokens * self.kv_heads * self.head_dim * 2


def check_options(args: argparse.Namespace) -> None:
    """``ValueError`` naming the first option that cannot make a run."""
    for name in _POSITIVE:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.kv_heads % TP:
        raise ValueError(f"--kv-heads must be divisible by the TP size {TP}")
    if args.min_tokens > args.max_tokens:
        raise ValueError("--min-tokens must not exceed --max-tokens")
    if args.layerwise_every < 0:
        raise ValueError("--layerwise-every must be 0 (never) or more")
    most = math.ceil(args.max_tokens / args.block_tokens)
    if args.blocks < most:
        raise ValueError(f"--blocks must be at least {most} (one {args.max_tokens}-token "
                         f"request at {args.block_tokens} tokens per block)")


def make_plan(args: argparse.Namespace) -> Plan:
    """The request list and geometry; ``ValueError`` naming the option when one is bad."""
    check_options(args)
    rng = random.Random(args.seed)
    requests = []
    for index in range(args.requests):
        tokens = rng.randint(args.min_tokens, args.max_tokens)
        layerwise = args.layerwise_every > 0 and index % args.layerwise_every == \
            args.layerwise_every - 1
        requests.append(Request(index, f"req-{args.seed}-{index}", tokens,
                                math.ceil(tokens / args.block_tokens), layerwise))
    return Plan(tuple(requests), args.concurrency, args.seed, args.blocks, args.layers,
                args.kv_heads // TP, args.head_dim, args.block_tokens, args.faults)
