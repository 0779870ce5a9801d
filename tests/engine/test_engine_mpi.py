"""TransferEngine across processes: MPITransport under ``mpiexec -n 2`` and ``-n 4`` (pairs
0->1, 2->3, and with 4 ranks a TP=2 variant over MPI sub-communicators), a failing rank
aborting the job, a rank dying (the launcher kills the job by default; with
``-disable-auto-cleanup`` the survivor fails, pins and drains), and TorchDistTransport with
gloo in two spawned processes."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

TORCH_SCRIPT = Path(__file__).resolve().parents[1] / "torch_scripts" / "engine_torch_gloo.py"

RunMPI = Callable[..., subprocess.CompletedProcess[str]]
RunPython = Callable[..., subprocess.CompletedProcess[str]]


@pytest.mark.mpi
@pytest.mark.parametrize(("ranks", "modes"), [(2, "pairs"), (4, "pairs,tp")])
def test_engine_mpi_transfers_bytes_between_ranks(run_mpi: RunMPI, ranks: int,
                                                   modes: str) -> None:
    result = run_mpi(ranks, "engine_mpi_transfer.py", modes, timeout=150)
    for mode in modes.split(","):
        for rank in range(ranks):
            assert f"rank {rank} engine {mode} OK" in result.stdout, result.stdout


@pytest.mark.mpi
def test_engine_mpi_failing_rank_aborts_job(run_mpi: RunMPI) -> None:
    result = run_mpi(2, "engine_mpi_transfer.py", "fail", timeout=90, check=False)
    assert result.returncode != 0, result.stdout
    assert "rank 1 fails on purpose" in result.stdout
    assert "engine fail OK" not in result.stdout


@pytest.mark.mpi
def test_engine_mpi_dying_rank_kills_the_job_by_default(run_mpi: RunMPI) -> None:
    # MPICH's launcher kills every rank when one dies: the survivor never reports.
    result = run_mpi(2, "engine_mpi_rank_death.py", timeout=240, check=False)
    assert "rank 1 dies now" in result.stdout, result.stdout
    assert result.returncode != 0, result.stdout
    assert "survivor OK" not in result.stdout, result.stdout


@pytest.mark.mpi
def test_engine_mpi_survivor_of_a_dying_rank_fails_pins_and_drains(run_mpi: RunMPI) -> None:
    # With the launcher's auto-cleanup off the survivor lives on: both transfers fail with
    # peer_lost / transport_error, the MPI send's blocks stay pinned, drain reports it (the
    # script asserts each; see engine_mpi_rank_death.py).
    result = run_mpi(2, "engine_mpi_rank_death.py", timeout=240, check=False,
                     launcher_args=["-disable-auto-cleanup"])
    assert "rank 0 survivor OK" in result.stdout, result.stdout
    assert "rank 0 leaving" in result.stdout, result.stdout


def test_engine_torch_gloo_two_ranks(run_python: RunPython) -> None:
    result = run_python([str(TORCH_SCRIPT)], timeout=180)
    assert result.returncode == 0, result.stdout
    for rank in range(2):
        assert f"rank {rank} engine torch OK" in result.stdout, result.stdout
