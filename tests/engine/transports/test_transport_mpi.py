"""MPITransport under real ``mpiexec`` jobs (2 and 4 ranks), spawned with timeouts; a failing
rank aborts the whole job. Skipped where mpi4py or mpiexec is missing."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

RunMPI = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("ranks", [2, 4])
def test_transport_mpi_exchange_moves_bytes_and_control(run_mpi: RunMPI, ranks: int) -> None:
    result = run_mpi(ranks, "transport_mpi_exchange.py", timeout=120)
    for rank in range(ranks):
        assert f"rank {rank}/{ranks} transport OK" in result.stdout, result.stdout


def test_transport_mpi_failing_rank_aborts_job(run_mpi: RunMPI) -> None:
    result = run_mpi(2, "transport_mpi_abort.py", timeout=60, check=False)
    assert result.returncode != 0, result.stdout
    assert "rank 1 fails on purpose" in result.stdout


def test_transport_mpi_missing_mpi4py_is_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from kvhandoff.engine.transports import MPITransport, TransportUnavailableError

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `from mpi4py import MPI` fail
    with pytest.raises(TransportUnavailableError) as info:
        MPITransport()
    assert info.value.backend == "mpi" and "pip install kvhandoff[mpi]" in str(info.value)
