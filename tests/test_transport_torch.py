"""TorchDistTransport with gloo in spawned processes (a launcher script run with a timeout),
and its typed error when torch.distributed is not initialised."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "torch_scripts" / "transport_torch_gloo.py"

RunPython = Callable[..., subprocess.CompletedProcess[str]]


def test_transport_torch_gloo_two_ranks(run_python: RunPython) -> None:
    result = run_python([str(SCRIPT), "2"], timeout=180)
    assert result.returncode == 0, result.stdout
    for rank in range(2):
        assert f"rank {rank}/2 torch transport OK" in result.stdout, result.stdout


def test_transport_torch_needs_initialised_process_group() -> None:
    import torch.distributed as dist
    from kvhandoff.engine.transports import TorchDistTransport, TransportUnavailableError

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised in this test process")
    with pytest.raises(TransportUnavailableError) as info:
        TorchDistTransport()
    assert info.value.backend == "torch.distributed"
    assert "init_process_group" in str(info.value)
