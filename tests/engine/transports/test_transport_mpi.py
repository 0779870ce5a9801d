"""MPITransport under real ``mpiexec`` jobs (2 and 4 ranks), spawned with timeouts; a failing
rank aborts the whole job. Skipped where mpi4py or mpiexec is missing.

Ranks on one host move data by cross-memory read (the default); ``KVHANDOFF_MPI_CMA=0`` runs
the same scripts over MPI messages and datatypes, so both paths stay covered."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

RunMPI = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = pytest.mark.mpi

CMA_OFF = {"KVHANDOFF_MPI_CMA": "0"}


@pytest.mark.parametrize(("ranks", "env"), [(2, None), (4, None), (2, CMA_OFF)],
                         ids=["2-cma", "4-cma", "2-mpi"])
def test_transport_mpi_exchange_moves_bytes_and_control(run_mpi: RunMPI, ranks: int,
                                                        env: dict[str, str] | None) -> None:
    result = run_mpi(ranks, "transport_mpi_exchange.py", timeout=120, env=env)
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


@pytest.mark.parametrize("env", [None, CMA_OFF], ids=["cma", "mpi-datatype"])
def test_transport_mpi_regions_move_block_to_block(run_mpi: RunMPI,
                                                   env: dict[str, str] | None) -> None:
    result = run_mpi(2, "transport_mpi_regions.py", timeout=120, env=env)
    for rank in range(2):
        assert f"rank {rank} regions OK" in result.stdout, result.stdout


def test_transport_mpi_cma_moves_blocks_and_keeps_them_until_acked(run_mpi: RunMPI) -> None:
    result = run_mpi(2, "transport_mpi_cma.py", "transport,engine", timeout=180)
    if "cma unavailable" in result.stdout:
        pytest.skip(result.stdout.strip().splitlines()[0])
    for rank in range(2):
        for mode in ("transport", "engine"):
            assert f"rank {rank} cma {mode} OK" in result.stdout, result.stdout


def test_transport_mpi_logs_why_the_one_copy_path_is_off(run_mpi: RunMPI,
                                                          tmp_path: Path) -> None:
    """One ``transport.cma_unavailable`` line per peer, only with logging on and only when
    the path was not agreed (the script checks each transport's lines); every line follows
    the schema."""
    import json

    from kvhandoff.analysis import schema

    result = run_mpi(2, "transport_mpi_cma_log.py", str(tmp_path), timeout=120)
    for rank in range(2):
        assert f"rank {rank} cma log OK" in result.stdout, result.stdout
        lines = [json.loads(line) for line in
                 (tmp_path / f"rank-{rank}.jsonl").read_text().splitlines()]
        assert len(lines) >= 3, lines  # use_cma=False, the environment, one side off
        for line in lines:
            assert schema.check_line(line) == [], line


def test_engine_zero_copy_over_mpi_datatypes(run_mpi: RunMPI) -> None:
    """The engine's region path over MPI datatypes (CMA off): its pairings (NHD and HND
    pools, partial last blocks among them) and faults."""
    result = run_mpi(2, "engine_mpi_zero_copy.py", "paths,paths-hnd,faults", timeout=240,
                     env=CMA_OFF)
    for rank in range(2):
        for mode in ("paths", "paths-hnd", "faults"):
            assert f"rank {rank} zero-copy {mode} OK" in result.stdout, result.stdout


def test_transport_mpi_region_longer_than_an_int_is_described_as_several() -> None:
    import numpy as np
    import torch
    from kvhandoff.engine.transports._mpi import _MAX_REGION_BYTES, _mpi_blocks
    from kvhandoff.engine.transports._regions import Regions

    top = _MAX_REGION_BYTES
    lengths = np.array([10, 2 * top + 5, top], dtype=np.uint64)
    addresses = np.array([1000, 1 << 40, 1 << 41], dtype=np.uint64)
    regions = Regions(addresses, lengths, torch.device("cpu"), (), int(lengths.sum()))
    out_lengths, out_addresses = _mpi_blocks(regions)
    assert out_lengths == [10, top, top, 5, top]
    assert out_addresses == [1000, 1 << 40, (1 << 40) + top, (1 << 40) + 2 * top, 1 << 41]
