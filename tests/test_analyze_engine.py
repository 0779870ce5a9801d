"""``kvhandoff analyze`` on the logs of a real engine run: a stuck handle quarantined, a
cancel, a health flip. The report must name the right requests and ranks, and the rank files
must carry the engine's events with the keys of docs/log-schema.md."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kvhandoff.collectives import configure_logging, rank_logger
from kvhandoff.engine import BlockPool, TransferEngine, TransferTimeout
from kvhandoff.engine._diagnosis import analyze_logs
from kvhandoff.engine.transports import loopback_group
from kvhandoff.sessions import CancelResult
from test_engine_support import HeldTransport, ManualClock, fast_config, running, until

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def log_dir(tmp_path: Path) -> Iterator[Path]:
    configure_logging(tmp_path)
    try:
        yield tmp_path
    finally:
        configure_logging(None)


def _pool(rank: int) -> BlockPool:
    return BlockPool(16, 2, 4, 2, 8, debug=True, logger=rank_logger(rank))


async def _scenario() -> None:
    """Rank 0 sends "stuck" and "stuck-2" (handles wedged until released) and "cancelled"
    (cancelled in flight by the receiver, rank 1). Both wedged sends time out and are
    quarantined; two quarantines exceed the budget of 1, so rank 0 turns unhealthy, and
    healthy again once the handles finish."""
    clock = ManualClock()
    t0, t1 = loopback_group(2)
    h0 = HeldTransport(t0, held=[0, 1], cancellable=True)
    p0, p1 = _pool(0), _pool(1)
    cfg = fast_config(transfer_timeout_s=1.0, quarantine_budget=1, progress_deadline_s=100.0)
    async with running(TransferEngine(p0, h0, config=cfg, clock=clock),
                       TransferEngine(p1, t1, config=cfg, clock=clock), clock=clock) as (e0, e1):
        blocks = {}
        handles = {}
        for rid in ("stuck", "stuck-2", "cancelled"):
            src, dst = p0.alloc(1, owner=rid), p1.alloc(1, owner=rid)
            blocks[rid] = (src, dst)
            handles[rid] = e0.send(rid, src, 1)
            p0.free(src, owner=rid)  # deferred: logged as pool.deferred_free
            if rid != "cancelled":
                await e1.receive(rid, dst, 0).wait()
        e1.receive("cancelled", blocks["cancelled"][1], 0)
        await until(lambda: e1.session("cancelled").state.name == "IN_FLIGHT")
        assert e1.cancel("cancelled") is CancelResult.CANCEL_REQUESTED_IN_FLIGHT
        await clock.advance(1.5)
        for rid in ("stuck", "stuck-2"):
            with pytest.raises(TransferTimeout):
                await handles[rid].wait()
        assert not e0.health().healthy
        for index in (0, 1):
            h0.release(index)
        await until(lambda: p0.num_deferred == 0 and e0.health().healthy)
        for rid, (_, dst) in blocks.items():
            await until(lambda rid=rid: not p1.pinned_by(rid))
            p1.free(dst, owner=rid)
    p0.check()
    p1.check()


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_analyze_engine_reports_quarantine_cancel_and_health(log_dir: Path) -> None:
    await _scenario()
    lines0, lines1 = _lines(log_dir / "rank-0.jsonl"), _lines(log_dir / "rank-1.jsonl")
    events0 = {line["event"] for line in lines0}
    assert {"session.transition", "health.change", "pool.deferred_free"} <= events0
    cancel_lines = [line for line in lines1 if line["event"] == "session.cancel"]
    assert len(cancel_lines) == 1
    assert {"request_id", "state", "result", "safe_to_free"} <= set(cancel_lines[0])
    transition = next(line for line in lines0 if line["event"] == "session.transition")
    assert {"request_id", "role", "peer", "from_state", "to_state", "trigger",
            "reason"} <= set(transition)
    assert all(line["rank"] == 0 for line in lines0)

    report = analyze_logs(log_dir)
    assert report.ranks == (0, 1)
    quarantined = {(q.rank, q.request_id, q.reason) for q in report.quarantines}
    assert (0, "stuck", "transfer_timeout") in quarantined
    assert (0, "stuck-2", "transfer_timeout") in quarantined
    assert [(c.rank, c.request_id, c.result) for c in report.cancels] == [
        (1, "cancelled", cancel_lines[0]["result"])]
    assert report.cancels[0].state == "IN_FLIGHT"
    flips = [(h.rank, h.healthy, h.reason) for h in report.health_changes]
    assert (0, False, "quarantine_budget_exceeded") in flips
    assert flips[-1][:2] == (0, True)  # it recovered once the handles finished
    assert not report.pinned_blocks  # every deferred free was released
    assert any("quarantine" in problem for problem in report.problems)


async def test_analyze_engine_cli_json_names_requests_and_ranks(log_dir: Path) -> None:
    await _scenario()
    result = subprocess.run(
        [sys.executable, "-m", "kvhandoff.engine._cli", "analyze", "--json", str(log_dir)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    assert {(q["rank"], q["request_id"]) for q in report["quarantines"]} >= {
        (0, "stuck"), (0, "stuck-2")}
    assert [(c["rank"], c["request_id"]) for c in report["cancels"]] == [(1, "cancelled")]
    assert any(h["rank"] == 0 and h["healthy"] is False
               and h["reason"] == "quarantine_budget_exceeded"
               for h in report["health_changes"])
