"""TransferEngine over NixlTransport: two processes on 127.0.0.1 (tests/nixl_scripts/
engine_nixl.py), each job under the launcher's deadline and this test's timeout. Byte-verified
whole and layer-wise transfers on the region path; the one-sided quiescence rules: a cancel
while the receiver's advertisement is out (requested, not safe to free, released on the
sender's answer), a cancel and a deadline with the WRITE in flight (the target stopped,
``UCX_TLS=tcp``: quarantined, blocks pinned until the WRITE is final), the target killed
(the sender fails ``peer_lost``, outcome unknown), the initiator killed (the receiver fails
``peer_lost`` through the transport's probe, far inside its lease, its blocks pinned through
the fencing grace; the poison pool shows no early reuse), skipped without the nixl extra.
Also, without NIXL: the leases act on the transport's peer-lost probe before the lease lapses,
and a two-sided handle does not retract."""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from kvhandoff.engine._leases import Leases
from kvhandoff.engine.transports import loopback_group

HAVE_NIXL = importlib.util.find_spec("nixl_cu13") is not None
needs_nixl = pytest.mark.skipif(
    not HAVE_NIXL, reason="nixl is not installed: pip install 'kvhandoff[nixl]'")
SCRIPT = Path(__file__).resolve().parents[1] / "nixl_scripts" / "engine_nixl.py"
RunPython = Callable[..., subprocess.CompletedProcess[str]]


def test_leases_fail_a_peer_the_transport_reports_lost_before_the_lease_lapses() -> None:
    leases = Leases(lease_s=60.0, heartbeat_every_s=15.0, now=0.0)
    for peer, rid in [(1, "a"), (1, "b"), (2, "c")]:
        leases.opened(peer, rid)
        leases.engaged(peer, 0.0)
    lost = {1: "peer 1 lost: NIXL_ERR_REMOTE_DISCONNECT"}
    found = list(leases.lapsed(1.0, lost.get))
    assert [(peer, why, sorted(rids)) for peer, why, rids in found] == [
        (1, lost[1], ["a", "b"])]
    assert list(leases.lapsed(1.0)) == []  # without the probe: the lease alone, not lapsed
    late = list(leases.lapsed(61.0, lost.get))
    assert [(peer, why) for peer, why, _ in late] == [
        (1, lost[1]), (2, "no message from rank 2 for 61.0s")]


def test_a_two_sided_handle_does_not_retract() -> None:
    a, b = loopback_group(2)
    assert not a.one_sided
    handle = b.post_recv(torch.zeros(8, dtype=torch.uint8), 0, 1)
    assert handle.retract() is False and not handle.final  # nothing changed
    assert handle.cancel() is True


@needs_nixl
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
