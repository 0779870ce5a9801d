"""How fast ``kvhandoff analyze`` reads and analyzes per-rank logs, against the raw baseline.

Generates a realistic multi-rank log directory (per-call collective logging on: an agreement
allgather per engine tick and a bcast per batch, every request's session transitions and
deferred frees, health changes, and a desync with flight-recorder dumps near the end), then
times, side by side in one run (taking turns, best of ``--repeats`` rounds):

- ours: ``analyze_logs`` end to end, as ``kvhandoff analyze`` runs it (rank files digested in
  one worker process per CPU), and the same in one process (``workers=1``);
- baseline: the stdlib way to read the same files (``json.loads`` line by line, nothing else);
- decode only: msgspec ``decode_lines`` into plain dicts, the floor of any msgspec reader.

Prints events/s for each, the ratio ours / baseline, and ours against the goal of 1M events/s.
Usage: ``python benchmarks/bench_analyze.py [--ranks 4] [--events-per-rank 750000]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
from kvhandoff.analysis import analyze_logs

GOAL_EVENTS_PER_S = 1_000_000
T0 = 1_795_000_000.0
AGREE_SITE = "/srv/kvhandoff/engine/_engine.py:412 _agreement_round"
BCAST_SITE = "/srv/kvhandoff/engine/_engine.py:388 _broadcast_batch"
STATES = ("QUEUED", "ADVERTISED", "IN_FLIGHT", "COMPLETE")
TRIGGERS = ("ADMIT", "HANDSHAKE", "POSTED", "DONE")


def generate_rank(path: Path, rank: int, ranks: int, events: int) -> int:
    """Write about ``events`` lines for ``rank``; return how many were written."""
    encode = msgspec.json.Encoder().encode
    out: list[bytes] = []
    ts = T0 + rank * 1e-4
    seq = 0
    tick = 0
    while len(out) < events:
        tick += 1
        ts += 1e-3
        op, site = ("bcast", BCAST_SITE) if tick % 8 == 0 else ("allgather", AGREE_SITE)
        out.append(encode({"ts": ts, "rank": rank, "event": "collective.enter", "level": "debug",
                           "comm": "tp", "seq": seq, "op": op, "site": site, "tag": None,
                           "root": 0 if op == "bcast" else None, "reduce_op": None,
                           "summary": "list[4]"}))
        out.append(encode({"ts": ts + 2e-4, "rank": rank, "event": "collective.exit",
                           "level": "debug", "comm": "tp", "seq": seq, "op": op, "site": site,
                           "tag": None, "duration_s": 2e-4, "state": "completed"}))
        seq += 1
        if tick % 4 == 0:  # a request's transfer: four transitions and its deferred free
            request_id = f"req-{tick // 4}"
            for step, (old, new) in enumerate(itertools.pairwise(STATES)):
                out.append(encode({"ts": ts + step * 1e-4, "rank": rank,
                                   "event": "session.transition", "level": "info",
                                   "request_id": request_id, "role": "sender",
                                   "peer": (rank + ranks // 2) % ranks, "from_state": old,
                                   "to_state": new, "trigger": TRIGGERS[step + 1],
                                   "reason": None, "outcome_unknown": None}))
            for phase in ("deferred", "released"):
                out.append(encode({"ts": ts + 4e-4, "rank": rank, "event": "pool.deferred_free",
                                   "level": "debug", "block_ids": [tick % 512, tick % 512 + 1],
                                   "owner": request_id, "phase": phase}))
        if tick % 5000 == 0:
            out.append(encode({"ts": ts, "rank": rank, "event": "health.change", "level": "info",
                               "healthy": True, "quarantined": 0, "quarantine_budget": 4,
                               "seconds_since_progress": 0.01, "in_flight": 3, "reason": None,
                               "restart_requested": False}))
    # The end of the run: rank 1 issues an extra gather (seed 000); every rank logs the desync.
    table = {str(r): {"seq": seq, "op": "allgather",
                      "site": BCAST_SITE if r == 1 else AGREE_SITE, "tag": None, "root": None,
                      "reduce_op": None} for r in range(ranks)}
    out.append(encode({"ts": ts + 1e-3, "rank": rank, "event": "collective.desync",
                       "level": "error", "comm": "tp", "seq": seq, "op": "allgather",
                       "site": table[str(rank)]["site"], "tag": None, "ranks": table,
                       "mismatched_ranks": [1]}))
    entries = [{"seq": s, "op": "allgather", "site": AGREE_SITE, "tag": None, "summary": "int",
                "start": ts - (seq - s) * 1e-3, "end": ts - (seq - s) * 1e-3 + 2e-4,
                "state": "completed"} for s in range(max(0, seq - 63), seq + 1)]
    entries[-1].update(end=ts + 1e-3, state="desync")
    out.append(encode({"ts": ts + 1e-3, "rank": rank, "event": "flight_recorder.dump",
                       "level": "warning", "comm": "tp", "reason": "desync", "entries": entries}))
    path.write_bytes(b"\n".join(out) + b"\n")
    return len(out)


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the worker processes)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def best_of(
    repeats: int, readers: dict[str, Callable[[], object]]
) -> dict[str, tuple[float, float]]:
    """Per reader, (wall seconds, CPU seconds) of its fastest of ``repeats`` runs. The readers
    take turns, round after round, so that a change in the load of a shared machine falls on
    all of them alike."""
    best = {name: (float("inf"), float("inf")) for name in readers}
    for _ in range(repeats):
        for name, fn in readers.items():
            wall, cpu = time.perf_counter(), _cpu_seconds()
            fn()
            best[name] = min(best[name], (time.perf_counter() - wall, _cpu_seconds() - cpu))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--events-per-rank", type=int, default=750_000)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kvhandoff-bench-") as tmp:
        log_dir = Path(tmp)
        total = sum(generate_rank(log_dir / f"rank-{rank}.jsonl", rank, args.ranks,
                                  args.events_per_rank) for rank in range(args.ranks))
        size_mb = sum(p.stat().st_size for p in log_dir.iterdir()) / 1e6
        files = sorted(log_dir.iterdir())

        def ours(workers: int | None = None) -> None:
            report = analyze_logs(log_dir, workers=workers)
            assert report.divergences and report.divergences[0].mismatched_ranks == (1,)

        def ours_one_process() -> None:
            ours(workers=1)

        def baseline() -> None:
            for path in files:
                with open(path, "rb") as file:
                    for raw in file:
                        json.loads(raw)

        def decode_only() -> None:
            decoder = msgspec.json.Decoder()
            for path in files:
                decoder.decode_lines(path.read_bytes())

        ours()  # warm the page cache and the imports
        load_before = os.getloadavg()[0]
        times = best_of(args.repeats, {
            "ours: analyze_logs (CLI path)": ours,
            "ours: analyze_logs, one process": ours_one_process,
            "baseline: json.loads per line": baseline,
            "msgspec decode_lines to dicts": decode_only,
        })
        t_ours = times["ours: analyze_logs (CLI path)"]
        t_base = times["baseline: json.loads per line"]

    print(f"log: {args.ranks} ranks, {total} events, {size_mb:.0f} MB")
    # The machine may be shared: the load average says how much of it this run had, and
    # events per CPU-second say what one otherwise idle core does.
    print(f"cpus: {os.cpu_count()}, load average before / after: {load_before:.1f} / "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'reader':<34}{'wall s':>9}{'events/s':>13}{'CPU s':>9}{'events/CPU-s':>15}")
    for name, (wall, cpu) in times.items():
        print(f"{name:<34}{wall:>9.2f}{total / wall:>13,.0f}{cpu:>9.2f}{total / cpu:>15,.0f}")
    print(f"ours / baseline speed (wall): {t_base[0] / t_ours[0]:.2f}x")
    print(f"ours vs goal ({GOAL_EVENTS_PER_S:,} events/s, wall): "
          f"{total / t_ours[0] / GOAL_EVENTS_PER_S:.2f}x")
    workers = min(os.cpu_count() or 1, args.ranks)
    idle = workers * total / t_ours[1]
    print(f"ours on {workers} otherwise idle cores (events per CPU-second x {workers}): "
          f"{idle:,.0f} events/s = {idle / GOAL_EVENTS_PER_S:.2f}x the goal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
