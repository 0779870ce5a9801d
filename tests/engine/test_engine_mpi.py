"""TransferEngine across processes: MPITransport under ``mpiexec -n 2`` and ``-n 4`` (pairs
0->1, 2->3, and with 4 ranks a TP=2 variant over MPI sub-communicators), a failing rank
aborting the job, and TorchDistTransport with gloo in two spawned processes."""

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


def test_engine_torch_gloo_two_ranks(run_python: RunPython) -> None:
    result = run_python([str(TORCH_SCRIPT)], timeout=180)
    assert result.returncode == 0, result.stdout
    for rank in range(2):
        assert f"rank {rank} engine torch OK" in result.stdout, result.stdout
