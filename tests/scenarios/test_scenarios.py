"""``kvhandoff scenario``: every seed scenario unsafe (the field's symptom) and safe (typed
error on every rank, then the fix completing; for 002 the engine's quarantine, deferred free
and recovery), embedded and under mpiexec, and ``analyze`` pointing at the bug in the unsafe
run's logs and finding the safe run's clean (002: only the injected fault)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import _run_with_timeout, find_mpiexec
from kvhandoff.analysis import Report, analyze_logs, schema
from kvhandoff.cli import main

KVHANDOFF = str(Path(sys.executable).with_name("kvhandoff"))


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["scenario", *args])
    return code, capsys.readouterr().out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, symptom, seq", [
    ("000", "TypeError on every rank", 1),
    ("001", "hung: ranks split", 2),
    ("003", "hung: ranks issued different numbers", 3),
])
def test_scenario_unsafe_shows_symptom_and_analyze_finds_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, symptom: str,
        seq: int) -> None:
    code, out = run_cli(capsys, name, "--unsafe", "--log-dir", str(tmp_path))
    assert code == 0, out
    assert "[unsafe] OK" in out and symptom in out
    if name == "000":
        assert out.count("TypeError: ") == 4
    else:
        assert all(f"rank {r}: " in out for r in range(4))
    report = analyze_logs(tmp_path)
    (divergence,) = report.divergences
    assert divergence.seq == seq
    assert len({p.site for p in divergence.positions}) == 2
    assert report.problems


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, seq", [("000", 1), ("001", 2), ("003", 3)])
def test_scenario_safe_raises_desync_then_fix_completes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, seq: int) -> None:
    code, out = run_cli(capsys, name, "--log-dir", str(tmp_path / "safe"))
    assert code == 0, out
    assert f"CollectiveDesyncError on every rank at seq {seq}" in out
    assert out.count(f"_s{name}.py:") == 2  # both call sites named
    assert "[fixed] OK (completed)" in out
    (divergence,) = analyze_logs(tmp_path / "safe").divergences  # the checked run's catch
    assert divergence.seq == seq and divergence.reported_by == (0, 1, 2, 3)
    if name == "003":
        assert "identical per-layer granularity on both ranks" in out
    code, out = run_cli(capsys, name, "--fixed", "--log-dir", str(tmp_path / "fixed"))
    assert code == 0 and "[fixed] OK" in out
    if list((tmp_path / "fixed").glob("rank-*.jsonl")):  # 003's engine logs its sessions
        assert analyze_logs(tmp_path / "fixed").problems == ()


def test_scenario_unknown_name_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "999")[0] == 2


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("args, expect, seq", [
    (("000", "--unsafe"), "TypeError on every rank", 1),
    (("000",), "CollectiveDesyncError on every rank at seq 1", 1),
    (("001", "--unsafe"), "hung in allreduce seq 2", 2),
    (("001",), "[fixed] OK (completed)", 2),
    (("003", "--unsafe"), "rank 0: hung in allreduce seq 3", 3),
    (("003",), "CollectiveDesyncError on every rank at seq 3", 3),
])
def test_scenario_under_mpiexec(tmp_path: Path, args: tuple[str, ...], expect: str,
                                seq: int) -> None:
    pytest.importorskip("mpi4py")
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found: install with `pip install kvhandoff[mpi]`")
    # The whole process group (every rank) is killed at the timeout.
    proc = _run_with_timeout([mpiexec, "-n", "4", KVHANDOFF, "scenario", *args, "--backend",
                              "mpi", "--log-dir", str(tmp_path)], 90, dict(os.environ))
    assert proc.returncode == 0, proc.stdout
    assert expect in proc.stdout, proc.stdout
    if "--unsafe" in args:
        assert all(f"rank {r}: " in proc.stdout for r in range(4)), proc.stdout
    report = analyze_logs(tmp_path)
    assert report.divergences and report.divergences[0].seq == seq


# --------------------------------------------------------------------------- seed 002
#
# Seed 0 wedges p0-req-0 and p0-req-1 on the link from rank 0 to rank 2; seed 3 wedges
# p1-req-1 and p1-req-2 on the link from rank 1 to rank 3 (the other link works throughout).
SEEDS_002 = [
    pytest.param(0, (0, 2), ("p0-req-0", "p0-req-1"), id="seed0-link0"),
    pytest.param(3, (1, 3), ("p1-req-1", "p1-req-2"), id="seed3-link1"),
]
S002 = Path(__file__).resolve().parents[2] / "scenarios" / "_s002.py"


def poll_site() -> str:
    """``_s002.py:LINE status_poll``: the naive poll's blocking ``wait()``."""
    lines = S002.read_text().splitlines()
    (lineno,) = [n for n, text in enumerate(lines, 1)
                 if text.strip() == "handle.wait()  # blocks while this transfer is unready"]
    return f"_s002.py:{lineno} status_poll"


def lines_follow_schema(log_dir: Path) -> None:
    files = sorted(log_dir.glob("rank-*.jsonl"))
    assert [f.name for f in files] == [f"rank-{r}.jsonl" for r in range(4)]
    for path in files:
        for number, text in enumerate(path.read_text().splitlines(), 1):
            line = json.loads(text)
            assert schema.check_line(line) == [], f"{path.name}:{number}: {line}"


def analyze_exit(capsys: pytest.CaptureFixture[str], log_dir: Path) -> tuple[int, str]:
    code = main(["analyze", str(log_dir)])
    return code, capsys.readouterr().out


def check_002_unsafe(out: str, report: Report, ranks: tuple[int, int],
                     stuck: tuple[str, str]) -> None:
    """The symptom in the verdict and the analyzer's findings in the unsafe logs."""
    sender, receiver = ranks
    site = poll_site()
    assert "[unsafe] OK (symptom shown)" in out, out
    assert f"frozen: the status polls of ranks {sender} and {receiver} were still blocked" in out
    assert f"rank {sender} (prefill): wait() on {stuck[0]}'s send at {site}" in out
    assert f"rank {receiver} (decode): wait() on {stuck[0]}'s recv at {site}" in out
    assert "(the other link): every transfer reported" in out
    assert "every element now 99: the sender's next requests' KV" in out
    assert "caught by the pool's poison check" in out and "PoisonError: freed blocks [" in out
    # Each end's loop stalled on the first wedged request, at the poll's wait().
    assert [(s.rank, s.request_id) for s in report.stalls] == [(sender, stuck[0]),
                                                               (receiver, stuck[0])]
    assert all(s.site.endswith(site) and s.bound_s == 1.0 for s in report.stalls)
    # Both hosts freed both wedged requests' blocks with their transfers pending, and only
    # those; the late write landed in the receiver's and is tied to them.
    assert sorted((f.rank, f.request_id) for f in report.early_frees) == sorted(
        (rank, rid) for rank in ranks for rid in stuck)
    (late,) = report.late_writes
    freed = sorted(b for f in report.early_frees if f.rank == receiver for b in f.block_ids)
    assert late.rank == receiver and list(late.block_ids) == freed
    assert late.freed_by == stuck and late.error.startswith("PoisonError: ")
    assert [(f.rank, f.request_id, f.fault) for f in report.injected_faults] == [
        (sender, stuck[0], "wedged"), (sender, stuck[1], "wedged")]
    assert any(p.startswith(f"rank {receiver}: late write into freed blocks {freed}")
               for p in report.problems)
    assert any(p.startswith(f"rank {sender}: host loop stalled in wait() on {stuck[0]}'s send")
               for p in report.problems)


def check_002_safe(out: str, report: Report, ranks: tuple[int, int],
                   stuck: tuple[str, str]) -> None:
    """Protection in the verdict; in the logs only the injected fault and what it explains."""
    sender, receiver = ranks
    assert "[fixed] OK (completed)" in out and "NOT AS EXPECTED" not in out, out
    assert "8 other transfers completed on both links" in out
    for rid in stuck:
        line = next(text for text in out.splitlines() if f"{rid}: wait() raised" in text)
        assert "no freeze; sender session QUARANTINED" in line
        assert "TransferTimeout" in line and "completed" not in line
    assert f"2 deferred on rank {sender}" in out
    assert "healthy=False (quarantine_budget_exceeded, 2 quarantined)" in out
    assert "deferred frees released (True)" in out and "healthy again (True)" in out
    assert "(no late write: True)" in out and "restart requested: False" in out
    assert report.problems == (), report.problems
    assert report.stalls == report.early_frees == report.late_writes == ()
    assert {q.request_id for q in report.quarantines} == set(stuck)
    assert {(f.rank, f.request_id) for f in report.failed_sessions} == {
        (rank, rid) for rank in ranks for rid in stuck}
    # The sender went over its quarantine budget; the receiver may have too, for a tick
    # (its sessions sit in QUARANTINED until its cancelled receives are final). Each one
    # that did is healthy again by the end, and nothing else ever was.
    unhealthy = sorted({c.rank for c in report.health_changes if c.healthy is False})
    assert sender in unhealthy and set(unhealthy) <= set(ranks)
    for rank in unhealthy:
        assert [c for c in report.health_changes if c.rank == rank][-1].healthy is True
    assert report.pinned_blocks == () and report.unfinished_sessions == ()
    assert report.expected == (
        f"fault injected on rank {sender}: wedged {stuck[0]} (peer {receiver}): the link holds "
        "this request's send until it recovers",
        f"fault injected on rank {sender}: wedged {stuck[1]} (peer {receiver}): the link holds "
        "this request's send until it recovers",
        f"4 session(s) failed, of the injected fault's request(s) {stuck[0]}, {stuck[1]}",
        f"{len(report.quarantines)} quarantine(s), of the injected fault's request(s) "
        f"{stuck[0]}, {stuck[1]}",
        f"engine unhealthy on rank(s) {', '.join(map(str, unhealthy))} over the injected "
        "fault's quarantines, healthy again by the end",
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed, ranks, stuck", SEEDS_002)
def test_scenario_002_unsafe_freezes_frees_early_and_late_write_is_caught(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], seed: int, ranks: tuple[int, int],
        stuck: tuple[str, str]) -> None:
    code, out = run_cli(capsys, "002", "--unsafe", "--seed", str(seed), "--log-dir",
                        str(tmp_path))
    assert code == 0, out
    lines_follow_schema(tmp_path)
    check_002_unsafe(out, analyze_logs(tmp_path), ranks, stuck)
    code, text = analyze_exit(capsys, tmp_path)
    assert code == 1 and "Problems found" in text and poll_site() in text


# The engine builds its block copy on first use (a minute on a loaded 2-core machine when
# the build cache is cold, well under a second after), before the scenario's own bounds.
@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed, ranks, stuck", SEEDS_002)
def test_scenario_002_safe_quarantines_defers_and_recovers(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], seed: int, ranks: tuple[int, int],
        stuck: tuple[str, str]) -> None:
    code, out = run_cli(capsys, "002", "--seed", str(seed), "--log-dir", str(tmp_path))
    assert code == 0, out
    lines_follow_schema(tmp_path)
    check_002_safe(out, analyze_logs(tmp_path), ranks, stuck)
    code, text = analyze_exit(capsys, tmp_path)
    assert code == 0 and "No problems found" in text
    assert "Expected (explained by injected faults)" in text


@pytest.mark.mpi
@pytest.mark.timeout(240)
@pytest.mark.parametrize("unsafe", [True, False], ids=["unsafe", "safe"])
def test_scenario_002_under_mpiexec(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    unsafe: bool) -> None:
    """Four real processes over MPITransport; the same verdicts and findings as embedded."""
    pytest.importorskip("mpi4py")
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found: install with `pip install kvhandoff[mpi]`")
    (seed, ranks, stuck), _, _ = SEEDS_002[1]
    mode = ["--unsafe"] if unsafe else []
    # The whole process group (every rank) is killed at the timeout.
    proc = _run_with_timeout([mpiexec, "-n", "4", KVHANDOFF, "scenario", "002", *mode,
                              "--seed", str(seed), "--backend", "mpi", "--log-dir",
                              str(tmp_path)], 200, dict(os.environ))
    assert proc.returncode == 0, proc.stdout
    assert f"[{'unsafe' if unsafe else 'fixed'}, mpi, seed {seed}]" in proc.stdout
    lines_follow_schema(tmp_path)
    check = check_002_unsafe if unsafe else check_002_safe
    check(proc.stdout, analyze_logs(tmp_path), ranks, stuck)
    assert analyze_exit(capsys, tmp_path)[0] == (1 if unsafe else 0)
