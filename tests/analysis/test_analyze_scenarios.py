"""``kvhandoff analyze`` on logs written by the real collectives code (in-process ranks) in
the seed scenarios: seed 000 (a gather issued inside a rank-divergent gate: desync) and seed
001 (a rank-local gate in front of a collective, one rank dead before it logged anything:
hang). The report must name the right ranks, sequence numbers and call sites - the lines of
this file that issued the calls. Seed 002's findings (a host's stalled loop, early frees, a
late write; what an injected fault explains and what it does not) from lines written by
the real rank loggers."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kvhandoff.analysis import NO_LOG_NOTE, Report, analyze, analyze_command, load_logs, schema
from kvhandoff.collectives import (
    CheckedComm,
    CollectiveDesyncError,
    CollectiveTimeoutError,
    configure_logging,
    simulate_ranks,
)

THIS_FILE = Path(__file__).name
# Short deadline: the hang scenario waits it out once.
DEADLINE_S = 0.5


def site_of(marker: str, function: str) -> str:
    """The call-site suffix (``file.py:LINE function``) of the line holding ``marker``."""
    lines = Path(__file__).read_text().splitlines()
    (lineno,) = [n for n, text in enumerate(lines, 1) if text.rstrip().endswith(f"# {marker}")]
    return f"{THIS_FILE}:{lineno} {function}"


@pytest.fixture
def log_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "logs"
    configure_logging(None)  # close this test's files; later tests log nowhere by default


def seed000_rank(comm: CheckedComm) -> None:
    """Seed 000: each iteration gathers every rank's state, then handles the previous
    batch's timeouts with a second gather - but one rank skips the second gather on one
    iteration (its previous batch is empty), so its next state gather meets its peers'
    timeout gather."""
    for iteration in range(4):
        comm.allgather({"rank": comm.rank, "iteration": iteration})  # MARK-state-gather
        process_previous_batch = not (comm.rank == 2 and iteration == 2)  # rank-local
        if process_previous_batch:
            comm.allgather(bool(iteration % 2))  # MARK-timeout-gather


def seed001_rank(comm: CheckedComm) -> None:
    """Seed 001: the status check (which holds a TP allgather) is entered only by ranks whose
    local scheduler fits no request; the others go on to the next phase's allreduce. Rank 3
    dies before that point, before it logged anything."""
    for step in range(3):
        comm.allgather(step)  # MARK-warmup
    if comm.rank == 3:
        raise RuntimeError("rank 3 lost its node")
    num_fitting = 0 if comm.rank < 2 else 1  # rank-local scheduler value
    if num_fitting == 0:
        comm.allgather("transfer status")  # MARK-status-check
    comm.allreduce(1.0)  # MARK-next-phase


def run_scenario(log_dir: Path, n: int, fn: Any, per_call: bool) -> list[Any]:
    """Run ``fn`` on ``n`` in-process ranks, logging to ``log_dir``; every line the real
    collectives code wrote must follow the schema exactly (its objects included: desync
    tables, positions, recorder entries, which the static scan cannot see)."""
    configure_logging(log_dir, per_call=per_call)
    results = simulate_ranks(n, fn, timeout=DEADLINE_S, return_exceptions=True)
    configure_logging(None)
    for path in sorted(log_dir.glob("rank-*.jsonl")):
        for number, text in enumerate(path.read_text().splitlines(), 1):
            line = json.loads(text)
            assert schema.check_line(line) == [], f"{path.name}:{number}: {line}"
    return results


def run_analyze(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    analyze_command.add_arguments(parser)
    code = analyze_command.run(parser.parse_args(list(args)))
    return code, capsys.readouterr().out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("per_call", [False, True], ids=["recorder-only", "per-call"])
def test_analyze_seed000_desync_names_rank_seq_and_sites(
    log_dir: Path, capsys: pytest.CaptureFixture[str], per_call: bool
) -> None:
    results = run_scenario(log_dir, 4, seed000_rank, per_call)
    assert all(isinstance(result, CollectiveDesyncError) for result in results)
    state_site = site_of("MARK-state-gather", "seed000_rank")
    timeout_site = site_of("MARK-timeout-gather", "seed000_rank")

    report: Report = analyze(load_logs(log_dir))
    (divergence,) = report.divergences
    # Iterations 0 and 1 used seq 0-3; iteration 2's state gather is seq 4, and seq 5 is
    # where rank 2 (which skipped its timeout gather) meets the others' timeout gather.
    assert (divergence.comm, divergence.seq) == ("sim", 5)
    assert divergence.mismatched_ranks == (2,)
    assert divergence.expected_op == "allgather"
    assert divergence.expected_site.endswith(timeout_site)
    by_rank = {position.rank: position for position in divergence.positions}
    assert sorted(by_rank) == [0, 1, 2, 3]
    assert by_rank[2].site.endswith(state_site) and by_rank[2].seq == 5
    for rank in (0, 1, 3):
        assert by_rank[rank].site.endswith(timeout_site) and by_rank[rank].seq == 5
    assert divergence.reported_by == (0, 1, 2, 3)
    assert report.hangs == () and report.missing_ranks == ()

    code, out = run_analyze(capsys, str(log_dir))
    assert code == 1
    assert "first divergence at seq 5" in out
    assert state_site in out and timeout_site in out


@pytest.mark.timeout(60)
def test_analyze_seed001_hang_with_absent_rank(
    log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = run_scenario(log_dir, 4, seed001_rank, per_call=False)
    assert [type(result) for result in results] == [CollectiveTimeoutError] * 3 + [RuntimeError]
    assert not (log_dir / "rank-3.jsonl").exists()  # it died before it logged anything
    status_site = site_of("MARK-status-check", "seed001_rank")
    next_site = site_of("MARK-next-phase", "seed001_rank")
    warmup_site = site_of("MARK-warmup", "seed001_rank")

    report = analyze(load_logs(log_dir))
    assert report.missing_ranks == (3,)
    (hang,) = report.hangs
    assert (hang.comm, hang.seq) == ("sim", 3)
    assert hang.stuck_ranks == (0, 1, 2) and hang.missing_ranks == (3,)
    where = {w.rank: w for w in hang.whereabouts}
    for rank in (0, 1):
        assert where[rank].position.site.endswith(status_site)
        assert where[rank].position.state == "timeout"
    assert where[2].position.site.endswith(next_site)
    assert where[2].position.op == "allreduce"
    # Rank 3 has no log: its last position is the one its peers reported.
    assert where[3].note.startswith(NO_LOG_NOTE)
    assert (where[3].position.seq, where[3].position.state) == (2, "completed")
    assert where[3].position.site.endswith(warmup_site)
    # Half the ranks in one collective, the other in another: also a divergence at seq 3.
    (divergence,) = report.divergences
    assert (divergence.seq, divergence.mismatched_ranks, divergence.absent_ranks) == (
        3,
        (2,),
        (3,),
    )

    code, out = run_analyze(capsys, str(log_dir))
    assert code == 1
    assert "never arrived: 3" in out and NO_LOG_NOTE in out
    assert status_site in out and next_site in out


@pytest.mark.timeout(60)
def test_analyze_seed001_per_call_logs_place_every_rank(log_dir: Path) -> None:
    run_scenario(log_dir, 4, seed001_rank, per_call=True)
    report = analyze(load_logs(log_dir))
    # With per-call logging rank 3 left a file (its three warm-up calls) and is not missing.
    assert report.missing_ranks == ()
    (hang,) = report.hangs
    assert hang.stuck_ranks == (0, 1, 2) and hang.missing_ranks == (3,)
    where = {w.rank: w for w in hang.whereabouts}
    assert where[3].position.source == "collective.enter"
    assert (where[3].position.seq, where[3].position.state) == (2, "completed")
    assert where[3].note == "behind: 1 call(s) before this one"


# --------------------------------------------------------------------------- seed 002
#
# A host's own lines (host.*), and the faults a run injects (fault.injected), written through
# the real rank loggers; the lines below are those kvhandoff scenario 002 writes, cut down.


def write_lines(log_dir: Path, lines: list[tuple[int, str, str, dict[str, Any]]]) -> None:
    """Log each ``(rank, level, event, keys)`` through the real writer; every line written
    must follow the schema."""
    from kvhandoff.collectives import rank_logger

    configure_logging(log_dir)
    for rank, level, event, keys in lines:
        getattr(rank_logger(rank), level)(event, **keys)
    configure_logging(None)
    for path in sorted(log_dir.glob("rank-*.jsonl")):
        for text in path.read_text().splitlines():
            assert schema.check_line(json.loads(text)) == [], text


def stalled(rank: int, request_id: str, site: str) -> tuple[int, str, str, dict[str, Any]]:
    return (rank, "error", "host.stalled",
            {"request_id": request_id, "call": f"wait() on {request_id}'s recv", "site": site,
             "bound_s": 1.0})


def host_free(rank: int, request_id: str, blocks: list[int],
              pending: bool) -> tuple[int, str, str, dict[str, Any]]:
    return (rank, "info", "host.free",
            {"request_id": request_id, "block_ids": blocks, "pending": pending})


def injected(rank: int, request_id: str) -> tuple[int, str, str, dict[str, Any]]:
    return (rank, "warning", "fault.injected",
            {"request_id": request_id, "fault": "wedged", "peer": 1,
             "detail": "the link holds this request's send"})


def transition(rank: int, request_id: str, from_state: str, to_state: str, trigger: str,
               reason: str | None = None) -> tuple[int, str, str, dict[str, Any]]:
    return (rank, "info", "session.transition",
            {"request_id": request_id, "role": "sender", "peer": 1, "from_state": from_state,
             "to_state": to_state, "trigger": trigger, "reason": reason,
             "outcome_unknown": None if reason is None else False})


def health(rank: int, healthy: bool, quarantined: int, reason: str | None = None,
           restart: bool = False) -> tuple[int, str, str, dict[str, Any]]:
    return (rank, "info", "health.change",
            {"healthy": healthy, "quarantined": quarantined, "quarantine_budget": 1,
             "seconds_since_progress": 0.5, "in_flight": quarantined, "reason": reason,
             "restart_requested": restart})


def wedged_and_recovered(rank: int, request_ids: list[str]) -> list[Any]:
    """What a safe engine logs for requests on a wedged link: each quarantined (over the
    budget of 1), health down, then each released and health back."""
    lines = [injected(rank, rid) for rid in request_ids]
    for rid in request_ids:
        lines += [transition(rank, rid, "QUEUED", "ADVERTISED", "ADVERTISE"),
                  transition(rank, rid, "ADVERTISED", "IN_FLIGHT", "POSTED"),
                  transition(rank, rid, "IN_FLIGHT", "QUARANTINED", "EXPIRE",
                             "transfer_timeout")]
    lines.append(health(rank, False, len(request_ids), "quarantine_budget_exceeded"))
    lines += [transition(rank, rid, "QUARANTINED", "FAILED", "QUIESCED", "transfer_timeout")
              for rid in request_ids]
    lines.append(health(rank, True, 0))
    return lines


@pytest.mark.timeout(60)
def test_analyze_host_stall_early_free_and_late_write(
    log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = site_of("MARK-host-wait", "naive_poll")
    write_lines(log_dir, [
        injected(0, "req-a"),
        stalled(1, "req-a", site),
        host_free(1, "req-b", [4], pending=False),  # its receive had finished: fine
        host_free(1, "req-a", [3, 5], pending=True),
        (1, "error", "host.poisoned", {"block_ids": [3], "owner": "next",
                                       "error": "PoisonError: freed blocks [3] were written"}),
        host_free(0, "req-a", [7], pending=False),
    ])
    report = analyze(load_logs(log_dir))
    (stall,) = report.stalls
    assert (stall.rank, stall.request_id, stall.call, stall.site) == (
        1, "req-a", "wait() on req-a's recv", site)
    (early,) = report.early_frees
    assert (early.rank, early.request_id, early.block_ids) == (1, "req-a", (3, 5))
    (late,) = report.late_writes
    assert (late.rank, late.block_ids, late.freed_by) == (1, (3,), ("req-a",))
    # The injected fault does not excuse the host's own mistakes.
    assert report.problems == (
        f"rank 1: host loop stalled in wait() on req-a's recv at {site} (still inside it "
        "after the 1 s watchdog bound)",
        "rank 1: blocks [3, 5] of req-a freed while its transfer was still pending (the "
        "transport may still read or write them)",
        "rank 1: late write into freed blocks [3], caught by the pool's poison check (freed "
        "early by req-a)",
    )
    assert report.expected == ("fault injected on rank 0: wedged req-a (peer 1): the link "
                               "holds this request's send",)
    timeline = analyze(load_logs(log_dir), request_id="req-a").timeline
    assert [(entry.rank, entry.event) for entry in timeline] == [
        (0, "fault.injected"), (1, "host.stalled"), (1, "host.free"), (0, "host.free")]
    assert "with its transfer still pending" in timeline[2].detail

    code, out = run_analyze(capsys, str(log_dir))
    assert code == 1 and site in out and "late write into freed blocks [3]" in out


def naive_poll(handles: list[Any]) -> None:
    """Where the stall's site points (the test only names this line)."""
    for handle in handles:
        handle.wait()  # MARK-host-wait


@pytest.mark.timeout(60)
def test_analyze_injected_fault_explains_quarantines_failures_and_recovered_health(
    log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_lines(log_dir, [*wedged_and_recovered(0, ["req-a", "req-b"]),
                          transition(1, "req-c", "QUEUED", "ADVERTISED", "ADVERTISE"),
                          transition(1, "req-c", "ADVERTISED", "IN_FLIGHT", "POSTED"),
                          transition(1, "req-c", "IN_FLIGHT", "COMPLETE", "COMPLETED")])
    report = analyze(load_logs(log_dir))
    assert report.problems == ()
    assert [(f.rank, f.request_id) for f in report.injected_faults] == [(0, "req-a"),
                                                                        (0, "req-b")]
    assert len(report.quarantines) == 2 and len(report.failed_sessions) == 2
    assert report.expected[2:] == (
        "2 session(s) failed, of the injected fault's request(s) req-a, req-b",
        "2 quarantine(s), of the injected fault's request(s) req-a, req-b",
        "engine unhealthy on rank(s) 0 over the injected fault's quarantines, healthy again "
        "by the end",
    )
    code, out = run_analyze(capsys, str(log_dir))
    assert code == 0 and "No problems found" in out
    assert "Expected (explained by injected faults)" in out and "req-b" in out


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("extra", "drop_recovery", "problems"),
    [
        # A quarantine of a request the fault did not hit is a problem, and so is the
        # unhealthy spell it shares with the injected ones.
        ([transition(0, "req-z", "IN_FLIGHT", "QUARANTINED", "EXPIRE", "transfer_timeout")],
         False, ("1 quarantine(s)", "engine unhealthy on rank(s) 0")),
        # Health that never came back.
        ([], True, ("engine unhealthy on rank(s) 0",)),
        # A restart is never expected.
        ([health(0, False, 2, "quarantine_budget_exceeded", restart=True), health(0, True, 0)],
         False, ("restart requested on rank(s) 0",)),
        # Unhealthy for another reason than the fault's quarantines.
        ([health(0, False, 0, "no_progress"), health(0, True, 0)], False,
         ("engine unhealthy on rank(s) 0",)),
        # A failure of a request the fault did not hit.
        ([transition(0, "req-z", "IN_FLIGHT", "FAILED", "HANDLE_FAILED", "transport_error")],
         False, ("1 session(s) failed",)),
    ],
    ids=["other-quarantine", "never-recovered", "restart", "no-progress", "other-failure"],
)
def test_analyze_injected_fault_explains_nothing_else(
    log_dir: Path, extra: list[Any], drop_recovery: bool, problems: tuple[str, ...]
) -> None:
    lines = wedged_and_recovered(0, ["req-a", "req-b"])
    if drop_recovery:
        lines = lines[:-1]
    write_lines(log_dir, [*lines, *extra])
    report = analyze(load_logs(log_dir))
    assert set(problems) <= set(report.problems), report.problems
    assert report.expected[:2] == tuple(
        f"fault injected on rank 0: wedged {rid} (peer 1): the link holds this request's send"
        for rid in ("req-a", "req-b"))
