"""TransferEngine over NixlTransport: two processes on 127.0.0.1 (tests/nixl_scripts/
engine_nixl.py), each job under the launcher's deadline and this test's timeout. Byte-verified
whole and layer-wise transfers on the region path; the one-sided quiescence rules: a cancel
while the receiver's advertisement is out (requested, not safe to free, released on the
sender's answer), a cancel and a deadline with the WRITE in flight (the target stopped,
``UCX_TLS=tcp``: quarantined, blocks pinned until the WRITE is final), the target killed
(the sender fails ``peer_lost``, outcome unknown), the initiator killed (the receiver fails
``peer_lost`` through the transport's probe, far inside its lease, its blocks pinned through
the fencing grace; the poison pool shows no early reuse). Skipped without the nixl extra."""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

HAVE_NIXL = importlib.util.find_spec("nixl_cu13") is not None
pytestmark = pytest.mark.skipif(
    not HAVE_NIXL, reason="nixl is not installed: pip install 'kvhandoff[nixl]'")
SCRIPT = Path(__file__).resolve().parents[1] / "nixl_scripts" / "engine_nixl.py"
RunPython = Callable[..., subprocess.CompletedProcess[str]]


@pytest.mark.parametrize(("scenario", "env", "killed"), [
    ("transfers", {}, ""),
    ("cancel_advertised", {}, ""),
    # Over tcp the target's own progress lands a WRITE: stopped, it holds the WRITE in flight.
    ("cancel_in_flight", {"UCX_TLS": "tcp"}, ""),
    ("deadline", {"UCX_TLS": "tcp"}, ""),
    ("target_killed", {"UCX_TLS": "tcp"}, "1"),
    ("initiator_killed", {"UCX_TLS": "tcp"}, "0"),
])
def test_engine_over_nixl(run_python: RunPython, scenario: str, env: dict[str, str],
                          killed: str) -> None:
    args = [str(SCRIPT), scenario, "--deadline-s", "100"]
    if killed:
        args += ["--expect-killed", killed]
    result = run_python(args, timeout=150, env=env)
    assert result.returncode == 0, result.stdout
    assert f"[launcher] {scenario}: all ranks OK" in result.stdout, result.stdout
    for rank in {0, 1} - {int(r) for r in killed.split(",") if r}:
        assert f"[rank {rank}] {scenario} OK" in result.stdout, result.stdout
