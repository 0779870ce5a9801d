"""``kvhandoff analyze`` over small synthetic logs written per docs/log-schema.md: parsing edge
cases, each finding, the exit codes and the JSON form."""

from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from kvhandoff.analysis import (
    NO_LOG_NOTE,
    LogDirError,
    Report,
    analyze,
    analyze_logs,
    load_logs,
)
from kvhandoff.analysis._digest import digest_rank
from kvhandoff.cli import COMMANDS

T0 = 1_763_700_000.0
SITE_A = "engine/_engine.py:120 _agree"
SITE_B = "engine/_engine.py:150 _flush_timeouts"


def line(event: str, rank: int, ts: float, **keys: Any) -> dict[str, Any]:
    return {"ts": T0 + ts, "rank": rank, "event": event, "level": "info", **keys}


def enter(rank: int, ts: float, seq: int, op: str = "allgather", site: str = SITE_A,
          comm: str = "world", tag: str | None = None) -> dict[str, Any]:
    return line("collective.enter", rank, ts, comm=comm, seq=seq, op=op, site=site, tag=tag,
                root=None, reduce_op=None, summary="list[2]")


def leave(rank: int, ts: float, seq: int, op: str = "allgather", site: str = SITE_A,
          comm: str = "world", tag: str | None = None, state: str = "completed") -> dict[str, Any]:
    return line("collective.exit", rank, ts, comm=comm, seq=seq, op=op, site=site, tag=tag,
                duration_s=0.001, state=state)


def calls(rank: int, count: int, start: float = 0.0, **keys: Any) -> list[dict[str, Any]]:
    """``count`` completed calls, seq 0..count-1, one every 10 ms."""
    out = []
    for seq in range(count):
        out.append(enter(rank, start + seq * 0.01, seq, **keys))
        out.append(leave(rank, start + seq * 0.01 + 0.001, seq, **keys))
    return out


def transition(rank: int, ts: float, request_id: str, from_state: str, to_state: str,
               trigger: str, reason: str | None = None) -> dict[str, Any]:
    return line("session.transition", rank, ts, request_id=request_id, role="sender", peer=2,
                from_state=from_state, to_state=to_state, trigger=trigger, reason=reason)


def write_rank(log_dir: Path, rank: int, lines: list[dict[str, Any]], tail: bytes = b"") -> Path:
    path = log_dir / f"rank-{rank}.jsonl"
    body = "".join(json.dumps(entry) + "\n" for entry in lines).encode()
    path.write_bytes(body + tail)
    return path


def run_cli(capsys: pytest.CaptureFixture[str], command: str, *args: str) -> tuple[int, str, str]:
    """Run one ``kvhandoff`` subcommand the way the CLI does (its module from COMMANDS), without
    importing the other commands' modules."""
    module = importlib.import_module(dict((name, mod) for name, mod, _ in COMMANDS)[command])
    parser = argparse.ArgumentParser(prog=f"kvhandoff {command}")
    module.add_arguments(parser)
    code = module.run(parser.parse_args(list(args)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def report_of(log_dir: Path, **kwargs: Any) -> Report:
    return analyze(load_logs(log_dir), **kwargs)


# --------------------------------------------------------------------------- input


def test_analyze_clean_logs_exit_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for rank in range(3):
        write_rank(tmp_path, rank, [
            *calls(rank, 5),
            transition(rank, 1.0, "req-1", "QUEUED", "ADVERTISED", "HANDSHAKE"),
            transition(rank, 1.1, "req-1", "ADVERTISED", "IN_FLIGHT", "POSTED"),
            transition(rank, 1.2, "req-1", "IN_FLIGHT", "COMPLETE", "DONE"),
        ])
    report = report_of(tmp_path)
    assert report.clean and report.problems == ()
    assert report.ranks == (0, 1, 2) and report.missing_ranks == ()
    assert report.event_count == 3 * 13
    code, out, _ = run_cli(capsys, "analyze", str(tmp_path))
    assert code == 0
    assert "No problems found." in out


def test_analyze_truncated_last_line_is_noted_and_rest_read(tmp_path: Path) -> None:
    write_rank(tmp_path, 0, calls(0, 3))
    write_rank(tmp_path, 1, calls(1, 3), tail=b'{"ts": 1763700001.0, "rank": 1, "event": "coll')
    logs = load_logs(tmp_path)
    assert len(logs.ranks[1].lines) == 6
    (note,) = logs.notes
    assert (note.kind, note.rank, note.line) == ("truncated_line", 1, 7)
    assert analyze(logs).clean


def test_analyze_garbage_and_schema_violating_lines_are_skipped(tmp_path: Path) -> None:
    path = write_rank(tmp_path, 0, calls(0, 2))
    lines = path.read_bytes().split(b"\n")
    lines.insert(1, b"Traceback (most recent call last):")
    lines.insert(3, json.dumps(line("collective.enter", 0, 0.5, seq="seven")).encode())
    lines.insert(4, b"")  # blank lines are not errors
    path.write_bytes(b"\n".join(lines))
    write_rank(tmp_path, 1, calls(1, 2))
    logs = load_logs(tmp_path)
    assert len(logs.ranks[0].lines) == 4
    assert [(note.kind, note.line) for note in logs.notes] == [("bad_line", 2), ("bad_line", 4)]
    assert "seq" in logs.notes[1].detail
    assert analyze(logs).clean


def test_analyze_bad_line_in_large_file_costs_one_chunk(tmp_path: Path) -> None:
    path = write_rank(tmp_path, 0, calls(0, 6000))
    data = path.read_bytes().split(b"\n")
    data[9000] = b"{not json"
    path.write_bytes(b"\n".join(data))
    logs = load_logs(tmp_path)
    assert len(logs.ranks[0].lines) == 11999
    assert [(note.kind, note.line) for note in logs.notes] == [("bad_line", 9001)]


def test_analyze_missing_rank_file_is_a_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_rank(tmp_path, 0, calls(0, 2))
    write_rank(tmp_path, 2, calls(2, 2))
    report = report_of(tmp_path)
    assert report.missing_ranks == (1,)
    assert f"rank 1: {NO_LOG_NOTE}" in report.problems
    assert [(note.kind, note.rank) for note in report.notes] == [("missing_file", 1)]
    code, out, _ = run_cli(capsys, "analyze", str(tmp_path))
    assert code == 1
    assert "no usable log from rank(s) 1" in out


def test_analyze_rank_mismatch_is_noted(tmp_path: Path) -> None:
    write_rank(tmp_path, 0, calls(0, 1) + calls(5, 1))
    (note,) = load_logs(tmp_path).notes
    assert note.kind == "rank_mismatch" and "2 line(s)" in note.detail


def test_analyze_empty_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("not a rank file")
    with pytest.raises(LogDirError) as excinfo:
        load_logs(tmp_path)
    assert excinfo.value.path == str(tmp_path)
    code, out, err = run_cli(capsys, "analyze", str(tmp_path))
    assert code == 2 and out == ""
    assert "no rank-<N>.jsonl file" in err


@pytest.mark.parametrize("make", ["missing", "file"])
def test_analyze_not_a_directory_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: str
) -> None:
    target = tmp_path / "logs"
    if make == "file":
        target.write_text("x")
    code, _, err = run_cli(capsys, "analyze", str(target))
    assert code == 2
    assert ("no such directory" if make == "missing" else "not a directory") in err


def test_analyze_unreadable_rank_files_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A directory where the rank file should be cannot be opened, even by root.
    (tmp_path / "rank-0.jsonl").mkdir()
    code, _, err = run_cli(capsys, "analyze", str(tmp_path))
    assert code == 2
    assert "none of its rank-<N>.jsonl files can be read" in err


def test_analyze_one_unreadable_rank_file_is_noted(tmp_path: Path) -> None:
    write_rank(tmp_path, 0, calls(0, 2))
    (tmp_path / "rank-1.jsonl").mkdir()
    report = report_of(tmp_path)
    assert report.ranks == (0,) and report.missing_ranks == (1,)
    assert "rank 1: log file unreadable" in report.problems


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any directory")
def test_analyze_unlistable_dir_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_rank(tmp_path, 0, calls(0, 1))
    tmp_path.chmod(0o000)
    try:
        code, _, err = run_cli(capsys, "analyze", str(tmp_path))
    finally:
        tmp_path.chmod(0o700)
    assert code == 2 and "cannot list it" in err


# --------------------------------------------------------------------------- collectives


def test_analyze_divergence_names_first_seq_ranks_and_sites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for rank in range(3):
        lines = calls(rank, 3)
        # From seq 3 on, rank 1 issues an extra gather from another line (seed 000).
        site = SITE_B if rank == 1 else SITE_A
        lines += [enter(rank, 0.05, 3, site=site), leave(rank, 0.051, 3, site=site, state="desync")]
        lines += [enter(rank, 0.06, 4, site=SITE_A if rank == 1 else SITE_B)]
        write_rank(tmp_path, rank, lines)
    report = report_of(tmp_path)
    (divergence,) = report.divergences
    assert (divergence.comm, divergence.seq) == ("world", 3)
    assert divergence.mismatched_ranks == (1,)
    assert (divergence.expected_op, divergence.expected_site) == ("allgather", SITE_A)
    assert {p.rank: p.site for p in divergence.positions} == {0: SITE_A, 1: SITE_B, 2: SITE_A}
    assert divergence.reported_by == ()
    code, out, _ = run_cli(capsys, "analyze", str(tmp_path))
    assert code == 1
    assert "first divergence at seq 3" in out and SITE_B in out and "MISMATCH" in out


def test_analyze_divergence_from_desync_lines_only(tmp_path: Path) -> None:
    table = {
        "0": {"seq": 7, "op": "allgather", "site": SITE_A, "tag": None, "root": None,
              "reduce_op": None},
        "1": {"seq": 7, "op": "allgather", "site": SITE_B, "tag": None, "root": None,
              "reduce_op": None},
    }
    for rank in range(2):
        write_rank(tmp_path, rank, [
            line("collective.desync", rank, 1.0, comm="tp", seq=7, op="allgather",
                 site=table[str(rank)]["site"], tag=None, ranks=table,
                 mismatched_ranks=[1 - rank]),
        ])
    report = report_of(tmp_path)
    (divergence,) = report.divergences
    assert (divergence.comm, divergence.seq, divergence.reported_by) == ("tp", 7, (0, 1))
    # Two ranks, two calls: the tie goes to the group of rank 0.
    assert divergence.mismatched_ranks == (1,)
    assert divergence.positions[1].site == SITE_B
    assert divergence.positions[1].source == "collective.desync (rank 0)"


def test_analyze_same_tag_from_two_sites_is_not_a_divergence(tmp_path: Path) -> None:
    for rank in range(2):
        site = SITE_A if rank == 0 else SITE_B  # the `if rank == root: bcast(x)` idiom
        write_rank(tmp_path, rank, calls(rank, 4, op="bcast", site=site, tag="weights"))
    assert report_of(tmp_path).divergences == ()


def test_analyze_divergence_reported_per_communicator(tmp_path: Path) -> None:
    for rank in range(2):
        lines = calls(rank, 3, comm="tp")
        lines += calls(rank, 2, comm="pp", op="barrier" if rank else "allreduce")
        write_rank(tmp_path, rank, lines)
    report = report_of(tmp_path)
    assert [(d.comm, d.seq) for d in report.divergences] == [("pp", 0)]
    assert report_of(tmp_path, comm="tp").clean


def test_analyze_hang_from_timeouts_with_absent_rank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    positions = {
        "0": {"seq": 5, "op": "allgather", "site": SITE_B, "tag": None, "state": "pending"},
        "1": {"seq": 5, "op": "allgather", "site": SITE_B, "tag": None, "state": "pending"},
        "2": {"seq": 4, "op": "allgather", "site": SITE_A, "tag": None, "state": "completed"},
    }
    for rank in range(2):
        lines = [
            line("collective.timeout", rank, 2.0 + rank * 0.01, comm="world", seq=5,
                 op="allgather", site=SITE_B, tag=None, deadline_s=1.0, arrived=[0, 1],
                 missing=[2], positions=positions),
            line("flight_recorder.dump", rank, 2.0 + rank * 0.01, comm="world",
                 reason="timeout", entries=[
                     {"seq": 4, "op": "allgather", "site": SITE_A, "tag": None,
                      "summary": "int", "start": T0 + 0.5, "end": T0 + 0.51,
                      "state": "completed"},
                     {"seq": 5, "op": "allgather", "site": SITE_B, "tag": None,
                      "summary": "bool", "start": T0 + 1.0, "end": None, "state": "timeout"},
                 ]),
        ]
        write_rank(tmp_path, rank, lines)
    write_rank(tmp_path, 3, calls(3, 5))  # rank 3 is fine and went on
    report = report_of(tmp_path)
    (hang,) = report.hangs
    assert (hang.comm, hang.seq, hang.op, hang.site) == ("world", 5, "allgather", SITE_B)
    assert hang.stuck_ranks == (0, 1) and hang.missing_ranks == (2,)
    assert hang.at == pytest.approx(T0 + 2.0)
    where = {w.rank: w for w in hang.whereabouts}
    assert where[0].note == "stuck in this collective" and where[0].position.state == "timeout"
    assert where[2].note.startswith(NO_LOG_NOTE)
    assert where[2].position is not None and where[2].position.seq == 4  # as rank 0 saw it
    assert where[3].position is not None and where[3].position.seq == 4
    assert where[3].note == "behind: 1 call(s) before this one"
    assert report.missing_ranks == (2,)
    code, out, _ = run_cli(capsys, "analyze", str(tmp_path))
    assert code == 1
    assert "never arrived: 2" in out and NO_LOG_NOTE in out


def test_analyze_hang_from_enter_without_exit(tmp_path: Path) -> None:
    # Rank 0 entered seq 3 and its log ends; rank 1 is at seq 3 too but in another op.
    write_rank(tmp_path, 0, [*calls(0, 3), enter(0, 0.5, 3)])
    write_rank(tmp_path, 1, [
        *calls(1, 3),
        enter(1, 0.4, 3, op="barrier", site=SITE_B),
        line("health.change", 1, 0.6, healthy=True),
    ])
    report = report_of(tmp_path)
    assert [(h.seq, h.stuck_ranks) for h in report.hangs] == [(3, (0, 1))]
    (hang,) = report.hangs
    assert hang.at == pytest.approx(T0 + 0.6)  # the stuck ranks' last line
    where = {w.rank: w for w in hang.whereabouts}
    assert where[1].position.op == "barrier" and where[1].position.state == "pending"
    # Two ranks, two calls: the tie goes to the group of rank 0.
    assert [(d.seq, d.mismatched_ranks) for d in report.divergences] == [(3, (1,))]


def test_analyze_whereabouts_taken_at_hang_time(tmp_path: Path) -> None:
    # Rank 0 times out at t=1.0 in seq 2; rank 1 was done with seq 1 by then (it reaches
    # seq 2 only at t=5.0, after the timeout); rank 2 logged nothing on this comm.
    write_rank(tmp_path, 0, [
        *calls(0, 2),
        enter(0, 0.5, 2),
        line("collective.timeout", 0, 1.0, comm="world", seq=2, op="allgather", site=SITE_A,
             tag=None, deadline_s=0.5, arrived=[0], missing=[1, 2], positions={}),
        leave(0, 1.0, 2, state="timeout"),
    ])
    write_rank(tmp_path, 1, [*calls(1, 2), enter(1, 5.0, 2), leave(1, 5.1, 2, state="timeout")])
    write_rank(tmp_path, 2, [line("health.change", 2, 0.1, healthy=True)])
    report = report_of(tmp_path)
    hang = next(h for h in report.hangs if h.seq == 2)
    assert hang.stuck_ranks == (0, 1) and hang.missing_ranks == (2,)
    assert hang.at == pytest.approx(T0 + 1.0)
    where = {w.rank: w for w in hang.whereabouts}
    assert where[1].note == "stuck in this collective"
    assert where[2].position is None and "no call on 'world'" in where[2].note


def test_analyze_pending_dump_entry_only_counts_when_last(tmp_path: Path) -> None:
    def dump(rank: int, ts: float, last_state: str, seqs: range) -> dict[str, Any]:
        entries = [{"seq": seq, "op": "allreduce", "site": SITE_A, "tag": None,
                    "summary": "tensor", "start": T0 + seq, "end": T0 + seq + 0.1,
                    "state": "completed"} for seq in seqs]
        entries[-1].update(end=None, state=last_state)
        return line("flight_recorder.dump", rank, ts, comm="world", reason="request",
                    entries=entries)

    # Rank 0's pending seq 1 was a momentary state: a later dump shows it moved to seq 2.
    write_rank(tmp_path, 0, [dump(0, 1.05, "pending", range(2)),
                             dump(0, 2.5, "completed", range(3))])
    write_rank(tmp_path, 1, [dump(1, 2.5, "pending", range(3))])  # watchdog-style: still in 2
    report = report_of(tmp_path)
    assert [(h.seq, h.stuck_ranks) for h in report.hangs] == [(2, (1,))]
    assert report.divergences == ()


# --------------------------------------------------------------------------- sessions, health


def session_logs(tmp_path: Path) -> None:
    write_rank(tmp_path, 0, [
        transition(0, 0.1, "req-a", "QUEUED", "ADVERTISED", "HANDSHAKE"),
        transition(0, 0.2, "req-a", "ADVERTISED", "IN_FLIGHT", "POSTED"),
        transition(0, 1.2, "req-a", "IN_FLIGHT", "QUARANTINED", "DEADLINE", reason="timeout"),
        line("pool.deferred_free", 0, 1.3, block_ids=[4, 5, 6], owner="req-a",
             phase="deferred"),
        line("session.cancel", 0, 1.4, request_id="req-a", state="QUARANTINED",
             result="CANCEL_REQUESTED_IN_FLIGHT", safe_to_free=False),
        line("health.change", 0, 1.5, healthy=False, quarantined=1, quarantine_budget=0,
             seconds_since_progress=1.3, in_flight=1, reason="quarantine budget exceeded",
             restart_requested=False),
        transition(0, 2.0, "req-b", "QUEUED", "CANCELLED", "CANCEL"),
        line("session.cancel", 0, 2.0, request_id="req-b", state="QUEUED",
             result="CANCELLED_BEFORE_ADVERTISE", safe_to_free=True),
    ])
    write_rank(tmp_path, 1, [
        transition(1, 0.15, "req-a", "QUEUED", "ADVERTISED", "HANDSHAKE"),
        transition(1, 0.25, "req-a", "ADVERTISED", "IN_FLIGHT", "POSTED"),
        transition(1, 0.9, "req-a", "IN_FLIGHT", "FAILED", "ERROR", reason="peer_lost"),
        line("pool.deferred_free", 1, 0.95, block_ids=[1, 2], owner="req-a", phase="deferred"),
        line("pool.deferred_free", 1, 1.0, block_ids=[1, 2], owner="req-a", phase="released"),
    ])


def test_analyze_sessions_quarantine_cancel_and_pins(tmp_path: Path) -> None:
    session_logs(tmp_path)
    report = report_of(tmp_path)
    assert [(s.rank, s.request_id, s.state, s.reason) for s in report.unfinished_sessions] == [
        (0, "req-a", "QUARANTINED", "timeout")
    ]
    assert [(s.rank, s.request_id, s.reason) for s in report.failed_sessions] == [
        (1, "req-a", "peer_lost")
    ]
    assert [(q.rank, q.request_id, q.from_state) for q in report.quarantines] == [
        (0, "req-a", "IN_FLIGHT")
    ]
    assert [(c.request_id, c.result, c.safe_to_free) for c in report.cancels] == [
        ("req-a", "CANCEL_REQUESTED_IN_FLIGHT", False),
        ("req-b", "CANCELLED_BEFORE_ADVERTISE", True),
    ]
    assert [(p.rank, p.owner, p.block_ids) for p in report.pinned_blocks] == [
        (0, "req-a", (4, 5, 6))
    ]
    assert [(h.rank, h.healthy) for h in report.health_changes] == [(0, False)]
    assert report.problems == (
        "1 session(s) never reached a terminal state",
        "1 session(s) failed",
        "1 quarantine(s)",
        "1 deferred free(s) never released",
        "engine unhealthy on rank(s) 0",
    )


def test_analyze_request_timeline_across_ranks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    session_logs(tmp_path)
    report = report_of(tmp_path, request_id="req-a")
    assert [(entry.rank, entry.event) for entry in report.timeline] == [
        (0, "session.transition"),
        (1, "session.transition"),
        (0, "session.transition"),
        (1, "session.transition"),
        (1, "session.transition"),
        (1, "pool.deferred_free"),
        (1, "pool.deferred_free"),
        (0, "session.transition"),
        (0, "pool.deferred_free"),
        (0, "session.cancel"),
    ]
    assert "IN_FLIGHT -> FAILED on ERROR" in report.timeline[4].detail
    code, out, _ = run_cli(capsys, "analyze", str(tmp_path), "--request", "req-a")
    assert code == 1
    assert "Timeline of request 'req-a'" in out and "peer_lost" in out
    code, out, _ = run_cli(capsys, "analyze", str(tmp_path), "--request", "nope")
    assert "No line mentions request 'nope'." in out


def test_analyze_json_output_is_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    session_logs(tmp_path)
    code, out, _ = run_cli(capsys, "analyze", str(tmp_path), "--json", "--request", "req-a")
    assert code == 1
    data = json.loads(out)
    report = report_of(tmp_path, request_id="req-a")
    assert data["problems"] == list(report.problems)
    assert data["unfinished_sessions"][0]["request_id"] == "req-a"
    assert data["pinned_blocks"][0]["block_ids"] == [4, 5, 6]
    assert len(data["timeline"]) == len(report.timeline)
    assert data["ranks"] == [0, 1] and data["hangs"] == [] and data["divergences"] == []


def test_analyze_markup_in_values_is_printed_verbatim(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for rank in range(2):
        site = "x.py:1 [bold]f" if rank else "x.py:2 g"
        write_rank(tmp_path, rank, calls(rank, 1, site=site))
    code, out, _ = run_cli(capsys, "analyze", str(tmp_path))
    assert code == 1
    assert "x.py:1 [bold]f" in out


def test_analyze_and_trace_are_registered_commands(capsys: pytest.CaptureFixture[str]) -> None:
    modules = {name: module for name, module, _ in COMMANDS}
    assert modules["analyze"] == "kvhandoff.analysis.analyze_command"
    assert modules["trace"] == "kvhandoff.analysis.trace_command"
    for command in ("analyze", "trace"):
        with pytest.raises(SystemExit) as excinfo:
            run_cli(capsys, command, "--help")
        assert excinfo.value.code == 0
        assert "LOG_DIR" in capsys.readouterr().out


# --------------------------------------------------------------------------- engine


def test_analyze_tp_failure_names_error_and_ranks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    error = "CollectiveTimeoutError: seq 7 on comm 'tp' timed out after 5.0s"
    for rank in (0, 1):
        write_rank(tmp_path, rank, [
            line("engine.tp_failed", rank, 1.0 + rank, error=error.replace("seq", f"r{rank} seq")),
        ])
    write_rank(tmp_path, 2, [line("health.change", 2, 0.5, healthy=True)])
    report = report_of(tmp_path)
    assert [(f.rank, f.error_type) for f in report.tp_failures] == [
        (0, "CollectiveTimeoutError"), (1, "CollectiveTimeoutError")]
    assert report.tp_failures[0].error.startswith("CollectiveTimeoutError: r0 seq 7")
    assert report.problems == (
        "TP group broken on rank(s) 0, 1: CollectiveTimeoutError: r0 seq 7 on comm 'tp' "
        "timed out after 5.0s",
    )
    code, out, _ = run_cli(capsys, "analyze", str(tmp_path))
    assert code == 1
    assert "TP group broken (engine.tp_failed, logged by rank(s) 0, 1)" in out
    code, out, _ = run_cli(capsys, "analyze", str(tmp_path), "--json")
    data = json.loads(out)
    assert [(f["rank"], f["error_type"]) for f in data["tp_failures"]] == [
        (0, "CollectiveTimeoutError"), (1, "CollectiveTimeoutError")]


def test_analyze_engine_warnings_counted_with_first_examples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_rank(tmp_path, 0, [
        line("control.rejected", 0, 0.1 * n, source=1, what="cancel",
             detail=f"unknown request 'r{n}'") for n in range(5)
    ] + [
        line("engine.drain_left", 0, 2.0, left=[{"request_id": "a", "state": "IN_FLIGHT"},
                                                {"request_id": "b", "state": "QUARANTINED"}]),
        line("engine.tp_failed", 0, 2.5, error="not an exception text"),
    ])
    write_rank(tmp_path, 1, [
        line("control.rejected", 1, 0.05, source=0, what="decode", detail="bad magic"),
        line("control.send_failed", 1, 0.3, peer=0, error="ConnectionError('down')"),
        line("engine.group_incomplete", 1, 1.0, request_id="a", quiescent=[1]),
    ])
    report = report_of(tmp_path, request_id="a")
    tallies = {t.event: t for t in report.engine_warnings}
    assert list(tallies) == ["control.rejected", "control.send_failed", "engine.drain_left",
                             "engine.group_incomplete"]
    rejected = tallies["control.rejected"]
    assert (rejected.count, rejected.ranks) == (6, (0, 1))
    assert [(e.rank, e.detail) for e in rejected.examples] == [
        (0, "cancel from rank 1: unknown request 'r0'"),
        (1, "decode from rank 0: bad magic"),
        (0, "cancel from rank 1: unknown request 'r1'"),
    ]
    assert tallies["engine.drain_left"].examples[0].detail == (
        "2 transfer(s) still open: a (IN_FLIGHT), b (QUARANTINED)")
    assert tallies["engine.group_incomplete"].examples[0].detail == (
        "a released without the group; quiescent TP rank(s): 1")
    assert report.tp_failures[0].error_type is None
    assert report.problems == (
        "TP group broken on rank(s) 0: not an exception text",
        "6 control message(s) rejected, on rank(s) 0, 1",
        "1 control message(s) could not be sent, on rank(s) 1",
        "a drain ended with transfers still open, on rank(s) 0",
        "1 request(s) released without the TP group's agreement, on rank(s) 1",
    )
    assert [(e.rank, e.event) for e in report.timeline] == [
        (1, "engine.group_incomplete"), (0, "engine.drain_left")]
    code, out, _ = run_cli(capsys, "analyze", str(tmp_path))
    assert code == 1 and "Engine warnings" in out and "ConnectionError('down')" in out
    code, out, _ = run_cli(capsys, "analyze", str(tmp_path), "--json")
    data = json.loads(out)
    assert [t["count"] for t in data["engine_warnings"]] == [6, 1, 1, 1]
    assert data["engine_warnings"][0]["examples"][0]["detail"].startswith("cancel from")


# --------------------------------------------------------------------------- digest, workers


def test_analyze_call_log_merges_enter_exit_and_dump(tmp_path: Path) -> None:
    entries = [
        {"seq": seq, "op": "allgather", "site": SITE_B, "tag": None, "summary": None,
         "start": T0 + seq, "end": T0 + seq + 0.5, "state": "completed"} for seq in range(4)
    ]
    entries[-1].update(end=None, state="pending")
    write_rank(tmp_path, 0, [
        line("flight_recorder.dump", 0, 9.0, comm="world", reason="signal", entries=entries),
        enter(0, 1.0, 1),  # per-call logging switched on for seq 1 only
        leave(0, 1.2, 1),
        # An exit without its enter: named by the exit, started duration_s before it.
        line("collective.exit", 0, 2.4, comm="world", seq=2, op="bcast", site=SITE_A,
             tag="w", duration_s=0.25, state="failed"),
    ])
    log = digest_rank(load_logs(tmp_path).ranks[0]).calls["world"]
    assert log.seqs.tolist() == [0, 1, 2, 3]
    by_seq = {seq: log.position_of(0, seq) for seq in range(4)}
    assert (by_seq[0].site, by_seq[0].state, by_seq[0].source) == (
        SITE_B, "completed", "flight_recorder.dump"
    )
    assert (by_seq[1].site, by_seq[1].ts, by_seq[1].source) == (SITE_A, T0 + 1.0,
                                                                 "collective.enter")
    assert (by_seq[2].op, by_seq[2].tag, by_seq[2].state) == ("bcast", "w", "failed")
    assert by_seq[2].ts == pytest.approx(T0 + 2.15)
    assert by_seq[3].state == "pending"
    # As it was at t=1.1: inside seq 1 (entered at 1.0, left at 1.2).
    at = log.last_position_at(0, T0 + 1.1)
    assert (at.seq, at.state) == (1, "pending")
    assert log.last_position_at(0, T0 - 1.0) is None


def test_analyze_logs_in_workers_matches_in_process(tmp_path: Path) -> None:
    session_logs(tmp_path)
    for rank in (0, 1):
        with (tmp_path / f"rank-{rank}.jsonl").open("a") as file:
            for entry in calls(rank, 3, site=SITE_B if rank else SITE_A):
                file.write(json.dumps(entry) + "\n")
    in_process = report_of(tmp_path, request_id="req-a")
    assert in_process.divergences and in_process.unfinished_sessions
    assert analyze_logs(tmp_path, request_id="req-a", workers=2) == in_process
    assert analyze_logs(tmp_path, request_id="req-a", workers=1) == in_process
