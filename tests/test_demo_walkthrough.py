"""`kvhandoff demo`: the scripted lifecycle walk-through over the real sessions and pools."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

from kvhandoff.engine import _demo
from kvhandoff.sessions import CancelResult


def test_demo_walkthrough_console_script_runs_every_scene_and_leaks_nothing() -> None:
    exe = Path(sys.executable).parent / "kvhandoff"
    result = subprocess.run([str(exe), "demo"], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for result_name in (r.name for r in CancelResult):  # every cancel outcome is shown
        assert f"-> {result_name} (safe_to_free=" in out, result_name
    for line in (
        "QUEUED -> CANCELLED",
        "ADVERTISED -> FAILED      (CANCEL)  reason=cancelled",
        "IN_FLIGHT -> QUARANTINED (EXPIRE)  reason=transfer_timeout",
        "QUEUED -> FAILED      (EXPIRE)  reason=queue_timeout",
        "IN_FLIGHT -> COMPLETE    (COMPLETED)",
        "hold the prefill KV: True",
        "pool.deferred_free block_ids=[5, 6] owner=req-cf phase=deferred",
        "pool.deferred_free block_ids=[5, 6] owner=req-cf phase=released",
        "UNHEALTHY (quarantine_budget_exceeded)",
        "RESTART REQUESTED",
        "prefill 32/32 blocks free, 0 pinned, 0 deferred, 0 sessions",
        "decode  32/32 blocks free, 0 pinned, 0 deferred, 0 sessions",
        "no leak",
    ):
        assert line in out, line
    assert "!!" not in out


def test_demo_walkthrough_books_fail_on_a_leak() -> None:
    out = io.StringIO()
    walk = _demo._Walkthrough(8, out, quiet=True)
    walk.scene_cancel_in_flight()
    walk.tick(0.5)
    walk.prefill.pool.alloc(1, owner="forgotten")  # a block the host never gives back
    assert walk.books() == 1
    assert "1 blocks leaked" in out.getvalue() and "FAILED" in out.getvalue()


def test_demo_walkthrough_rejects_a_pool_too_small() -> None:
    args = argparse.Namespace(blocks=2, quiet=True)
    assert _demo.run(args) == 2
