"""TorchDistTransport's NCCL path, one rank per GPU (tests/gpu/nccl_transport_ring.py run with
a timeout). NCCL refuses two ranks on one device, so this needs two or more GPUs."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

RING = Path(__file__).resolve().parent / "nccl_transport_ring.py"


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs 2 GPUs: NCCL refuses two ranks on one device")
@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_nccl_available(),
    reason="this torch has no NCCL",
)
def test_gpu_nccl_transport_ring_moves_cuda_buffers(
    run_python: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    result = run_python([str(RING), "2"], timeout=150)
    assert result.returncode == 0, result.stdout
    for rank in range(2):
        assert f"rank {rank}/2 nccl transport OK" in result.stdout, result.stdout
