"""``kvhandoff analyze`` on the logs of real engine runs: a stuck handle quarantined, a
cancel, a health flip; then the engine's warnings (a rejected and an unsendable control
message, a drain that left a transfer open) and a TP group that loses a request and then
breaks. The report must name the right requests and ranks, and every line the engines wrote
must follow the schema exactly (``schema.check_line``): the run-time half of the schema
check, for what the static scan (test_analysis_log_calls.py) cannot see."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_support import (
    HeldTransport,
    ManualClock,
    fast_config,
    running,
    until,
)
from kvhandoff.analysis import analyze_command, analyze_logs, schema
from kvhandoff.collectives import configure_logging, local_group, rank_logger
from kvhandoff.engine import BlockPool, TransferEngine, TransferFailed, TransferTimeout
from kvhandoff.engine.transports import loopback_group
from kvhandoff.sessions import CancelResult

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
    """Rank 0 receives "stuck" and "stuck-2" (handles wedged until released) and sends
    "cancelled" (cancelled in flight by the receiver, rank 1). Both wedged receives time out
    and are quarantined; two quarantines exceed the budget of 1, so rank 0 turns unhealthy,
    and healthy again once the handles finish. (A wedged *send* whose bytes landed is a
    success since the receiver confirms: the receiving side is where a timeout quarantines.)"""
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
            if rid == "cancelled":
                handles[rid] = e0.send(rid, src, 1)
            else:
                handles[rid] = e0.receive(rid, src, 1)
                e1.send(rid, dst, 0)  # its bytes land; rank 0's handle never says so
            p0.free(src, owner=rid)  # deferred: logged as pool.deferred_free
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


def assert_lines_follow_schema(log_dir: Path) -> set[str]:
    """Every line of every rank file follows the schema exactly; return the events seen."""
    events: set[str] = set()
    for path in sorted(log_dir.glob("rank-*.jsonl")):
        for number, line in enumerate(_lines(path), 1):
            assert schema.check_line(line) == [], f"{path.name}:{number}: {line}"
            events.add(str(line["event"]))
    return events


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
    assert assert_lines_follow_schema(log_dir) == {
        "session.transition", "session.cancel", "health.change", "pool.deferred_free"}

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
        [sys.executable, "-m", "kvhandoff.cli", "analyze", "--json", str(log_dir)],
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


def _logged(log_dir: Path, rank: int, event: str) -> bool:
    path = log_dir / f"rank-{rank}.jsonl"
    return path.exists() and f'"event":"{event}"' in path.read_text()


class _CutTransport(HeldTransport):
    """A transport whose control messages to the ranks in ``cut`` fail to send."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.cut: set[int] = set()

    def send_control(self, peer: int, payload: bytes) -> None:
        if peer in self.cut:
            raise ConnectionError(f"link to rank {peer} is down")
        super().send_control(peer, payload)


async def test_analyze_engine_warnings_are_reported(
    log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t0, t1 = loopback_group(2)
    h0, c1 = HeldTransport(t0, held=[0]), _CutTransport(t1)
    p0, p1 = _pool(0), _pool(1)
    e0 = TransferEngine(p0, h0, config=fast_config(drain_timeout_s=0.1))
    e1 = TransferEngine(p1, c1, config=fast_config())
    async with e0, e1:
        t1.send_control(0, b"not a control message")  # control.rejected on rank 0
        await until(lambda: e0.stats().control_rejected == 1)
        # control.send_failed on rank 1: its advertise to rank 0 cannot be sent.
        c1.cut = {0}
        lost = p1.alloc(1, owner="lost")
        e1.send("lost", lost, 0)
        await until(lambda: _logged(log_dir, 1, "control.send_failed"))
        e1.cancel("lost")  # its word to rank 0 is lost too
        await until(lambda: not p1.pinned_by("lost"))
        p1.free(lost, owner="lost")
        c1.cut = set()
        # engine.drain_left on rank 0: its send (post 0) is wedged when it drains.
        src, dst = p0.alloc(2, owner="held"), p1.alloc(2, owner="held")
        sent = e0.send("held", src, 1)
        await e1.receive("held", dst, 0).wait()
        assert [left.request_id for left in (await e0.drain(0.1)).left] == ["held"]
        h0.release(0)
        await sent.wait()
        await until(lambda: not p0.pinned_by("held"))
        p0.free(src, owner="held")
        p1.free(dst, owner="held")
    events = assert_lines_follow_schema(log_dir)
    assert {"control.rejected", "control.send_failed", "engine.drain_left"} <= events

    report = analyze_logs(log_dir)
    tallies = {tally.event: tally for tally in report.engine_warnings}
    assert sorted(tallies) == ["control.rejected", "control.send_failed", "engine.drain_left"]
    assert (tallies["control.rejected"].count, tallies["control.rejected"].ranks) == (1, (0,))
    assert tallies["control.rejected"].examples[0].detail.startswith("decode from rank 1: ")
    assert tallies["control.send_failed"].ranks == (1,)
    assert "link to rank 0 is down" in tallies["control.send_failed"].examples[0].detail
    assert tallies["engine.drain_left"].examples[0].detail == (
        "1 transfer(s) still open: held (IN_FLIGHT)")
    assert "1 control message(s) rejected, on rank(s) 0" in report.problems
    assert "a drain ended with transfers still open, on rank(s) 0" in report.problems
    assert report.tp_failures == ()

    parser = argparse.ArgumentParser()
    analyze_command.add_arguments(parser)
    assert analyze_command.run(parser.parse_args([str(log_dir)])) == 1
    out = capsys.readouterr().out
    assert "Engine warnings" in out and "link to rank 0 is down" in out


async def test_analyze_engine_tp_group_lost_request_then_broke(
    log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ranks 0, 1: the prefill TP group; 2, 3: the decode TP group; r sends to r + 2. Only
    ranks 0 and 2 know "lonely", so their groups never agree on it and release it after the
    grace (engine.group_incomplete); then rank 1 closes its side of the prefill group, which
    breaks it (engine.tp_failed on ranks 0 and 1)."""
    transports = loopback_group(4)
    comms = [*local_group(2, name="prefill-tp"),
             *local_group(2, name="decode-tp", first_log_rank=2)]
    pools = [_pool(rank) for rank in range(4)]
    cfg = fast_config(queue_timeout_s=0.1, transfer_timeout_s=0.1, agreement_timeout_s=0.6)
    engines = [TransferEngine(pools[r], transports[r], tp_comm=comms[r], config=cfg,
                              layout_extra=(r % 2, 2)) for r in range(4)]
    async with running(*engines) as es:
        src, dst = pools[0].alloc(1, owner="lonely"), pools[2].alloc(1, owner="lonely")
        for handle in (es[0].send("lonely", src, 2), es[2].receive("lonely", dst, 0)):
            with pytest.raises((TransferTimeout, TransferFailed)):
                await handle.wait()
        await until(lambda: not pools[0].pinned_by("lonely")
                    and not pools[2].pinned_by("lonely"), timeout=5.0)
        pools[0].free(src, owner="lonely")
        pools[2].free(dst, owner="lonely")
        comms[1].close()
        await until(lambda: not es[0].health().healthy and not es[1].health().healthy)
    events = assert_lines_follow_schema(log_dir)
    assert {"engine.group_incomplete", "engine.tp_failed"} <= events

    report = analyze_logs(log_dir, request_id="lonely")
    assert sorted({failure.rank for failure in report.tp_failures}) == [0, 1]
    first = report.tp_failures[0]
    assert first.error.startswith(f"{first.error_type}: ") and first.error_type
    assert any(problem.startswith("TP group broken on rank(s) 0, 1: ")
               for problem in report.problems)
    (incomplete,) = [t for t in report.engine_warnings if t.event == "engine.group_incomplete"]
    assert set(incomplete.ranks) == {0, 2}
    assert any(entry.event == "engine.group_incomplete" for entry in report.timeline)
    assert any(change.reason == "tp_group_failed" for change in report.health_changes)

    parser = argparse.ArgumentParser()
    analyze_command.add_arguments(parser)
    assert analyze_command.run(parser.parse_args(["--json", str(log_dir)])) == 1
    data = json.loads(capsys.readouterr().out)
    assert sorted({f["rank"] for f in data["tp_failures"]}) == [0, 1]
    assert data["tp_failures"][0]["error"] == first.error
    assert "engine.group_incomplete" in {t["event"] for t in data["engine_warnings"]}
