"""``kvhandoff analyze`` on logs written by the real collectives code (in-process ranks) in
the seed scenarios: seed 000 (a gather issued inside a rank-divergent gate: desync) and seed
001 (a rank-local gate in front of a collective, one rank dead before it logged anything:
hang). The report must name the right ranks, sequence numbers and call sites - the lines of
this file that issued the calls."""

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
