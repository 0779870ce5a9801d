"""``kvhandoff trace``: the Chrome / Perfetto JSON it writes has the structure the viewers
need (metadata names, nested slices per thread, flows that bind to slices), from synthetic
logs and from logs of the real collectives code."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kvhandoff.analysis import build_trace, load_logs, schema, trace_command, write_trace
from kvhandoff.collectives import configure_logging, simulate_ranks

T0 = 1_763_700_000.0
PHASES = {"X", "i", "M", "s", "t", "f"}


def line(event: str, rank: int, ts: float, **keys: Any) -> dict[str, Any]:
    return {"ts": T0 + ts, "rank": rank, "event": event, "level": "info", **keys}


def call(rank: int, start: float, end: float, seq: int, comm: str = "world",
         op: str = "allgather") -> list[dict[str, Any]]:
    site = f"engine/_engine.py:{100 + seq} _agree"
    return [
        line("collective.enter", rank, start, comm=comm, seq=seq, op=op, site=site, tag=None,
             root=None, reduce_op=None, summary="int"),
        line("collective.exit", rank, end, comm=comm, seq=seq, op=op, site=site, tag=None,
             duration_s=end - start, state="completed"),
    ]


def write_rank(log_dir: Path, rank: int, lines: list[dict[str, Any]]) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps(entry) + "\n" for entry in lines)
    (log_dir / f"rank-{rank}.jsonl").write_text(body)


def check_trace(trace: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Assert the structure Perfetto / chrome://tracing rely on; return events by phase."""
    events = trace["traceEvents"]
    by_phase: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        assert event["ph"] in PHASES, event
        assert isinstance(event["pid"], int) and isinstance(event["tid"], int), event
        assert isinstance(event["name"], str), event
        if event["ph"] != "M":
            assert isinstance(event["ts"], float | int), event
        by_phase[event["ph"]].append(event)
    process_names = {e["pid"] for e in by_phase["M"] if e["name"] == "process_name"}
    thread_names = {(e["pid"], e["tid"]) for e in by_phase["M"] if e["name"] == "thread_name"}
    slices: dict[tuple[int, int], list[tuple[float, float]]] = defaultdict(list)
    for event in by_phase["X"] + by_phase["i"]:
        assert event["pid"] in process_names, event
        assert (event["pid"], event["tid"]) in thread_names, event
    for event in by_phase["X"]:
        assert event["dur"] > 0, event
        slices[(event["pid"], event["tid"])].append((event["ts"], event["ts"] + event["dur"]))
    for intervals in slices.values():  # slices on one thread nest or follow each other
        intervals.sort(key=lambda span: (span[0], -span[1]))
        stack: list[float] = []
        for begin, end in intervals:
            while stack and stack[-1] <= begin:
                stack.pop()
            assert not stack or end <= stack[-1], (begin, end, stack)
            stack.append(end)
    flows: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for phase in ("s", "t", "f"):
        for event in by_phase[phase]:
            flows[event["id"]].append(event)
            # A flow point lies inside a slice of its thread, which it binds to.
            assert any(
                begin <= event["ts"] <= end for begin, end in slices[(event["pid"], event["tid"])]
            ), event
    for points in flows.values():
        phases = [point["ph"] for point in sorted(points, key=lambda p: p["ts"])]
        assert phases[0] == "s" and phases[-1] == "f" and set(phases[1:-1]) <= {"t"}, phases
    return by_phase


def thread_name(by_phase: dict[str, list[dict[str, Any]]], pid: int, tid: int) -> str:
    (name,) = [e["args"]["name"] for e in by_phase["M"]
               if e["name"] == "thread_name" and (e["pid"], e["tid"]) == (pid, tid)]
    return name


def test_trace_collectives_slices_and_flows(tmp_path: Path) -> None:
    for rank in range(3):
        lines = []
        for seq in range(4):
            start = seq * 0.1 + rank * 0.01
            lines += call(rank, start, seq * 0.1 + 0.05, seq)
        write_rank(tmp_path, rank, lines)
    by_phase = check_trace(build_trace(load_logs(tmp_path)))
    slices = [e for e in by_phase["X"] if e["cat"] == "collective"]
    assert len(slices) == 12
    assert {e["pid"] for e in slices} == {0, 1, 2}
    first = next(e for e in slices if e["pid"] == 1 and e["args"]["seq"] == 0)
    assert first["name"] == "allgather #0"
    assert first["ts"] == pytest.approx(10_000.0)  # us after the earliest line
    assert first["dur"] == pytest.approx(40_000.0)
    assert thread_name(by_phase, 1, first["tid"]) == "collectives world"
    # One flow per seq, from the rank that entered first through to the last.
    assert len(by_phase["s"]) == len(by_phase["f"]) == 4 and len(by_phase["t"]) == 4
    assert sorted(e["pid"] for e in by_phase["s"]) == [0, 0, 0, 0]
    assert sorted(e["pid"] for e in by_phase["f"]) == [2, 2, 2, 2]
    assert all(e["bp"] == "e" for e in by_phase["f"])


def test_trace_session_states_and_instants(tmp_path: Path) -> None:
    def transition(ts: float, request_id: str, old: str, new: str, trigger: str) -> dict[str, Any]:
        return line("session.transition", 0, ts, request_id=request_id, role="sender", peer=1,
                    from_state=old, to_state=new, trigger=trigger, reason=None)

    write_rank(tmp_path, 0, [
        transition(0.0, "req-a", "QUEUED", "ADVERTISED", "HANDSHAKE"),
        transition(0.2, "req-a", "ADVERTISED", "IN_FLIGHT", "POSTED"),
        transition(0.5, "req-a", "IN_FLIGHT", "COMPLETE", "DONE"),
        transition(0.6, "req-b", "QUEUED", "ADVERTISED", "HANDSHAKE"),
        line("health.change", 0, 0.7, healthy=False, quarantined=1, quarantine_budget=0,
             seconds_since_progress=0.5, in_flight=1, reason="budget", restart_requested=False),
        line("session.cancel", 0, 0.9, request_id="req-b", state="ADVERTISED",
             result="CANCEL_REQUESTED_IN_FLIGHT", safe_to_free=False),
    ])
    by_phase = check_trace(build_trace(load_logs(tmp_path)))
    states = {(e["args"]["request_id"], e["name"]): e for e in by_phase["X"]}
    assert sorted(states) == [("req-a", "ADVERTISED"), ("req-a", "IN_FLIGHT"),
                              ("req-b", "ADVERTISED")]
    assert states[("req-a", "IN_FLIGHT")]["dur"] == pytest.approx(300_000.0)
    # A state still open at the end of the log runs to the rank's last line.
    assert states[("req-b", "ADVERTISED")]["dur"] == pytest.approx(300_000.0)
    tid_a = states[("req-a", "ADVERTISED")]["tid"]
    assert thread_name(by_phase, 0, tid_a) == "session req-a"
    assert tid_a != states[("req-b", "ADVERTISED")]["tid"]
    instants = {e["name"]: e for e in by_phase["i"]}
    assert instants["COMPLETE"]["tid"] == tid_a
    assert instants["health.change"]["args"]["healthy"] is False
    assert instants["session.cancel"]["args"]["result"] == "CANCEL_REQUESTED_IN_FLIGHT"
    assert thread_name(by_phase, 0, instants["health.change"]["tid"]) == "events"


def test_trace_engine_warnings_and_failures_are_instants(tmp_path: Path) -> None:
    write_rank(tmp_path, 0, [
        line("control.rejected", 0, 0.1, source=1, what="decode", detail="bad magic"),
        line("engine.drain_left", 0, 0.2, left=[{"request_id": "a", "state": "IN_FLIGHT"}]),
        line("engine.tp_failed", 0, 0.3, error="CommClosedError: closed"),
    ])
    by_phase = check_trace(build_trace(load_logs(tmp_path)))
    instants = {e["name"]: e for e in by_phase["i"]}
    assert sorted(instants) == ["control.rejected", "engine.drain_left", "engine.tp_failed"]
    assert instants["engine.tp_failed"]["args"] == {"level": "info",
                                                    "error": "CommClosedError: closed"}
    assert instants["engine.drain_left"]["args"]["left"] == [
        {"request_id": "a", "state": "IN_FLIGHT"}]
    assert {e["cat"] for e in instants.values()} == {"control", "engine"}


def test_trace_pending_and_overlapping_calls(tmp_path: Path) -> None:
    # Rank 0: a non-blocking call (seq 1) overlaps seq 2; seq 3 is pending in a dump.
    entries = [
        {"seq": 3, "op": "barrier", "site": "x.py:3 f", "tag": None, "summary": None,
         "start": T0 + 0.8, "end": None, "state": "pending"},
    ]
    write_rank(tmp_path, 0, [
        *call(0, 0.0, 0.1, 0),
        *call(0, 0.2, 0.6, 1),
        *call(0, 0.3, 0.4, 2)[:1],
        *call(0, 0.3, 0.7, 2)[1:],
        line("flight_recorder.dump", 0, 1.5, comm="world", reason="watchdog", entries=entries),
    ])
    by_phase = check_trace(build_trace(load_logs(tmp_path)))
    slices = {e["args"]["seq"]: e for e in by_phase["X"]}
    assert slices[1]["tid"] != slices[2]["tid"]
    assert thread_name(by_phase, 0, slices[2]["tid"]) == "collectives world (overlap 1)"
    assert slices[3]["args"]["state"] == "pending"
    assert slices[3]["ts"] + slices[3]["dur"] == pytest.approx(1_500_000.0)
    assert by_phase["i"][0]["args"]["entries"] == 1


@pytest.fixture
def log_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "logs"
    configure_logging(None)


@pytest.mark.timeout(60)
def test_trace_of_real_collectives_joins_ranks(
    log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def body(comm: Any) -> None:
        for step in range(5):
            comm.allgather(step)
        comm.barrier()

    configure_logging(log_dir, per_call=True)
    simulate_ranks(3, body, timeout=5.0)
    configure_logging(None)
    for path in log_dir.glob("rank-*.jsonl"):
        for text in path.read_text().splitlines():
            assert schema.check_line(json.loads(text)) == [], text
    output = log_dir.parent / "trace.json"
    parser = argparse.ArgumentParser()
    trace_command.add_arguments(parser)
    assert trace_command.run(parser.parse_args([str(log_dir), "-o", str(output)])) == 0
    assert "wrote" in capsys.readouterr().out
    trace = json.loads(output.read_text())
    by_phase = check_trace(trace)
    slices = [e for e in by_phase["X"] if e["cat"] == "collective"]
    assert len(slices) == 18
    assert {e["name"] for e in slices} == {f"allgather #{s}" for s in range(5)} | {"barrier #5"}
    assert len(by_phase["s"]) == len(by_phase["f"]) == 6
    assert trace["otherData"]["ranks"] == [0, 1, 2]
    assert write_trace(load_logs(log_dir), output) == len(trace["traceEvents"])


def test_trace_cli_unreadable_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    trace_command.add_arguments(parser)
    output = tmp_path / "trace.json"
    assert trace_command.run(parser.parse_args([str(tmp_path), "-o", str(output)])) == 2
    assert "no rank-<N>.jsonl file" in capsys.readouterr().err
    assert not output.exists()
