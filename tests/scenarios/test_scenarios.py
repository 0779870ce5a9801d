"""``kvhandoff scenario``: every collective seed scenario unsafe (the field's symptom) and
safe (typed error on every rank, then the fix completing), embedded and under mpiexec, and
``analyze`` pointing at the bug in the unsafe run's logs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import _run_with_timeout, find_mpiexec
from kvhandoff.analysis import analyze_logs
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


@pytest.mark.timeout(60)
def test_scenario_002_unsafe_freezes_and_late_write_is_caught(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(capsys, "002", "--unsafe")
    assert code == 0, out
    assert "[unsafe] OK" in out and "frozen: the status poll was still blocked" in out
    assert "wait() on req-1's receive at _s002.py:" in out
    assert "PoisonError: freed blocks [1] were written after free" in out


@pytest.mark.timeout(60)
def test_scenario_002_safe_quarantines_defers_and_recovers(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(capsys, "002")
    assert code == 0, out
    assert "[fixed] OK (completed)" in out and "NOT AS EXPECTED" not in out
    assert "4 other transfers completed" in out
    # Each stuck request fails on both sides; whichever deadline fires first times out.
    assert out.count("TransferTimeout") >= 2 and out.count("QUARANTINED") == 2
    assert "2 deferred on the sender" in out and "quarantine_budget_exceeded" in out
    assert "health healthy=True" in out and "restart requested: False" in out


def test_scenario_002_under_mpi_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scenario", "002", "--backend", "mpi"]) == 2
    assert "scenario 002 runs embedded only" in capsys.readouterr().err
