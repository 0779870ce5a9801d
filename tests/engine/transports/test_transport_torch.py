"""TorchDistTransport with gloo in spawned processes (a launcher script run with a timeout),
and its typed error when torch.distributed is not initialised."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import pytest

RunTorch = Callable[..., subprocess.CompletedProcess[str]]


def test_transport_torch_gloo_two_ranks(run_torch: RunTorch) -> None:
    result = run_torch("transport_torch_gloo.py", "2", timeout=180)
    for rank in range(2):
        assert f"rank {rank}/2 torch transport OK" in result.stdout, result.stdout


def test_torch_harness_failing_rank_ends_the_job(run_torch: RunTorch) -> None:
    # The harness every torch script runs on: rank 1 fails while rank 0 waits for it in a
    # barrier; the job must end now (not at the 60 s group timeout) with one report.
    start = time.monotonic()
    result = run_torch("harness_failures.py", "raise", timeout=120, check=False)
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stdout
    assert result.stdout.count("[rank 1] FAILED:") == 1, result.stdout
    assert "RuntimeError: rank 1 fails on purpose" in result.stdout, result.stdout
    assert "[launcher] process 1 terminated with exit code 1" in result.stdout, result.stdout
    assert "passed the barrier" not in result.stdout, result.stdout
    assert elapsed < 45, (elapsed, result.stdout)


def test_torch_harness_kills_a_job_past_its_deadline(run_torch: RunTorch) -> None:
    result = run_torch("harness_failures.py", "hang", timeout=120, check=False)
    assert result.returncode == 1, result.stdout
    assert "[launcher] ranks [0, 1] still running after 3.0s: killed the job" in (
        result.stdout), result.stdout
    assert "FAILED" not in result.stdout and "passed the barrier" not in result.stdout


def test_transport_torch_needs_initialised_process_group() -> None:
    import torch.distributed as dist
    from kvhandoff.engine.transports import TorchDistTransport, TransportUnavailableError

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised in this test process")
    with pytest.raises(TransportUnavailableError) as info:
        TorchDistTransport()
    assert info.value.backend == "torch.distributed"
    assert "init_process_group" in str(info.value)
