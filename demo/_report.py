"""The demo's report: one outcome per request, the books of every rank, and the exit code.

Exit code 0 only when no block leaked, none was written after its free, every received block
matched, the pools' books balance, no session outlived the drain and, without ``--faults``,
every request succeeded; 1 otherwise. With ``--faults`` failed requests are expected and
counted by reason.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from typing import IO

from kvhandoff.demo._host import OK, RankSummary
from kvhandoff.demo._plan import TP, Plan


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-quantile of ``values`` (NaN when there are none)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def request_outcomes(plan: Plan, summaries: Sequence[RankSummary]) -> list[str]:
    """One outcome per request: OK only if every rank succeeded; otherwise the first
    decode rank's failure (what the consumer saw), else the first prefill rank's."""
    ordered = sorted(summaries, key=lambda s: (s.role != "decode", s.rank))
    outcomes = []
    for request in plan.requests:
        seen = [s.outcomes.get(request.index, "not_run") for s in ordered]
        outcomes.append(next((o for o in seen if o != OK), OK))
    return outcomes


def report(plan: Plan, summaries: Sequence[RankSummary], seconds: float, out: IO[str]) -> int:
    """Print the summary tables; return the exit code (0: clean books and, without faults,
    every request delivered; 1 otherwise)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out, width=100)
    outcomes = request_outcomes(plan, summaries)
    counts = collections.Counter(outcomes)
    latencies = [t for s in summaries for t in s.latencies]
    moved = sum(s.bytes_verified for s in summaries)
    leaked = sum(s.leaked_blocks for s in summaries)
    early = sum(s.early_freed_blocks for s in summaries)
    mismatched = sum(s.mismatched_blocks for s in summaries)
    problems = [f"rank {s.rank}: {p}" for s in summaries for p in s.pool_problems]
    left = sum(s.drain_left for s in summaries)

    table = Table(title=f"kvhandoff demo: {len(plan.requests)} requests, 2 prefill + 2 decode "
                        f"ranks (TP={TP}), {plan.layers} layers x {plan.kv_heads} KV heads/rank "
                        f"x {plan.head_dim} x {plan.block_tokens} tokens, bf16",
                  show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("requests ok", f"{counts[OK]}/{len(plan.requests)}")
    for reason, n in sorted((r, n) for r, n in counts.items() if r != OK):
        table.add_row(f"  failed: {reason}", str(n))
    table.add_row("bytes verified on decode", f"{moved / 2**30:.2f} GiB")
    host = sum(s.host_seconds for s in summaries)
    table.add_row("transfer throughput",
                  f"{moved / seconds / 1e9:.2f} GB/s in {seconds:.1f} s of transfers")
    table.add_row("  not timed", f"KV writing and verification: {host:.1f} s (all ranks)")
    table.add_row("transfer latency p50 / p99",
                  f"{percentile(latencies, 0.5) * 1e3:.1f} / "
                  f"{percentile(latencies, 0.99) * 1e3:.1f} ms")
    table.add_row("leaked blocks", str(leaked))
    table.add_row("early-freed blocks", str(early))
    table.add_row("mismatched blocks", str(mismatched))
    table.add_row("sessions left after drain", str(left))
    console.print(table)

    ranks = Table(title="ranks")
    for column in ("rank", "role", "health", "restart", "quarantines", "leaked",
                   "early-freed", "faults injected"):
        ranks.add_column(column)
    for s in sorted(summaries, key=lambda s: s.rank):
        health = "healthy" if s.healthy else f"UNHEALTHY ({s.health_reason})"
        faults = ", ".join(f"{k}={v}" for k, v in sorted(s.faults_injected.items())) or "-"
        ranks.add_row(str(s.rank), s.role, health, "yes" if s.restart_requested else "no",
                      str(s.quarantines), str(s.leaked_blocks), str(s.early_freed_blocks),
                      faults)
    console.print(ranks)
    for problem in problems:
        console.print(f"pool check failed: {problem}")

    failed_requests = len(outcomes) - counts[OK]
    clean = not (leaked or early or mismatched or problems or left)
    if clean and (plan.faults or not failed_requests):
        console.print("OK: no block leaked or freed early; every delivered block matched byte "
                      "for byte")
        return 0
    console.print("FAILED: " + ", ".join(
        what for what, bad in (("blocks leaked", leaked), ("blocks freed early", early),
                               ("blocks corrupted", mismatched), ("pool books broken", problems),
                               ("sessions left after drain", left),
                               ("requests failed without faults",
                                failed_requests and not plan.faults)) if bad))
    return 1
