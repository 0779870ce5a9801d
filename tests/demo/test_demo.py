"""`kvhandoff demo`: the simulated disaggregated serving run, embedded and under mpiexec.

The end-to-end tests run the console script with a small model (4 layers, short prompts) so
the whole set stays fast; the defaults stay realistic (32 layers, 128..2048 tokens).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import _run_with_timeout, find_mpiexec
from kvhandoff.demo import _backends, _host, _plan, _report, command

EXE = Path(sys.executable).parent / "kvhandoff"
SMALL = ("--layers", "4", "--blocks", "64", "--max-tokens", "512", "--no-progress")


def _kvhandoff(*args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return _run_with_timeout([str(EXE), *args], timeout, env)


def _row(out: str, label: str) -> str:
    """The value cell of the summary row ``label``."""
    match = re.search(rf"{re.escape(label)}\s*│\s*([^│]+?)\s*│", out)
    assert match is not None, f"no {label!r} row in:\n{out}"
    return match.group(1)


def _assert_books_clean(out: str) -> None:
    for label in ("leaked blocks", "early-freed blocks", "mismatched blocks",
                  "sessions left after drain"):
        assert _row(out, label) == "0", f"{label}: {out}"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


# --- end to end --------------------------------------------------------------------------


def test_demo_embedded_delivers_every_request_and_leaks_nothing() -> None:
    result = _kvhandoff("demo", "--requests", "12", *SMALL)
    out = result.stdout
    assert result.returncode == 0, out
    assert _row(out, "requests ok") == "12/12"
    _assert_books_clean(out)
    assert "failed:" not in out
    assert out.count("healthy") == 4 and "UNHEALTHY" not in out
    assert "OK: no block leaked" in out


def test_demo_faults_report_failures_by_reason_and_still_leak_nothing() -> None:
    result = _kvhandoff("demo", "--requests", "16", "--faults", *SMALL)
    out = result.stdout
    assert result.returncode == 0, out
    _assert_books_clean(out)
    ok, total = (int(n) for n in _row(out, "requests ok").split("/"))
    failed = [int(n) for n in re.findall(r"failed: \w+\s*│\s*(\d+)", out)]
    assert total == 16 and ok + sum(failed) == 16
    assert failed, f"seed 0 injects errors and stuck operations that fail requests:\n{out}"
    assert "stuck=" in out and "error=" in out


def test_demo_log_dir_writes_every_rank_log_and_analyze_reads_them(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    result = _kvhandoff("demo", "--requests", "6", "--log-dir", str(logs), *SMALL)
    assert result.returncode == 0, result.stdout
    assert sorted(p.name for p in logs.iterdir()) == [f"rank-{r}.jsonl" for r in range(4)]
    for rank in range(4):  # every rank logged its own sessions
        assert '"event":"session.transition"' in (logs / f"rank-{rank}.jsonl").read_text()
    analyzed = _kvhandoff("analyze", str(logs))
    assert analyzed.returncode == 0, analyzed.stdout
    assert "ranks with logs: 0, 1, 2, 3" in analyzed.stdout


def _mpiexec() -> str:
    pytest.importorskip("mpi4py")
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found: install with `pip install kvhandoff[mpi]`")
    return mpiexec


def test_demo_mpi_backend_under_mpiexec_delivers_every_request() -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = _run_with_timeout(
        [_mpiexec(), "-n", "4", str(EXE), "demo", "--backend", "mpi", "--requests", "10",
         *SMALL], 180.0, env)
    out = result.stdout
    assert result.returncode == 0, out
    assert out.count("requests ok") == 1  # only rank 0 reports
    assert _row(out, "requests ok") == "10/10"
    _assert_books_clean(out)


def test_demo_nixl_backend_under_mpiexec_delivers_every_request() -> None:
    """Processes launched by mpiexec, TP groups over MPI, the KV over NIXL WRITEs."""
    if importlib.util.find_spec("nixl_cu13") is None:
        pytest.skip("nixl is not installed: pip install 'kvhandoff[nixl]'")
    env = dict(os.environ, PYTHONUNBUFFERED="1", NIXL_LOG_LEVEL="WARN")
    result = _run_with_timeout(
        [_mpiexec(), "-n", "4", str(EXE), "demo", "--backend", "nixl", "--requests", "6",
         *SMALL], 240.0, env)
    out = result.stdout
    assert result.returncode == 0, out
    assert out.count("requests ok") == 1  # only rank 0 reports
    assert _row(out, "requests ok") == "6/6"
    _assert_books_clean(out)


def test_demo_mpi_backend_needs_exactly_four_ranks() -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = _run_with_timeout(
        [_mpiexec(), "-n", "2", str(EXE), "demo", "--backend", "mpi", *SMALL], 120.0, env)
    assert result.returncode == 2, result.stdout
    assert "needs exactly 4 processes, got 2" in result.stdout


# --- options, plan and verdict -----------------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (("--blocks", "8"), "--blocks must be at least 128"),
    (("--kv-heads", "3"), "--kv-heads must be divisible by the TP size 2"),
    (("--min-tokens", "600", "--max-tokens", "500"), "--min-tokens must not exceed"),
    (("--requests", "0"), "--requests must be at least 1"),
])
def test_demo_bad_options_exit_2_with_the_option_named(
        argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert command.run(_args(*argv)) == 2
    assert message in capsys.readouterr().err


def test_demo_plan_is_deterministic_from_the_seed() -> None:
    plan = _plan.make_plan(_args("--requests", "40", "--seed", "7"))
    assert plan == _plan.make_plan(_args("--requests", "40", "--seed", "7"))
    assert plan != _plan.make_plan(_args("--requests", "40", "--seed", "8"))
    assert all(128 <= r.tokens <= 2048 and r.blocks == -(-r.tokens // 16)
               for r in plan.requests)
    assert [r.index for r in plan.requests if r.layerwise] == list(range(3, 40, 4))
    assert plan.kv_heads == 4 and plan.tensor_block_nbytes == 16 * 1024  # the TP shard


def _summary(rank: int, **changes: object) -> _host.RankSummary:
    fields: dict[str, object] = dict(
        rank=rank, role="prefill" if rank < 2 else "decode", outcomes={0: _host.OK},
        latencies=(0.01,) if rank >= 2 else (), bytes_verified=1 << 20, mismatched_blocks=0,
        healthy=True, health_reason=None, restart_requested=False, quarantines=0,
        leaked_blocks=0, early_freed_blocks=0, pool_problems=(), drain_left=0,
        faults_injected={})
    fields.update(changes)
    return _host.RankSummary(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("changes", "faults", "code"), [
    ({}, False, 0),
    ({"leaked_blocks": 3}, True, 1),
    ({"early_freed_blocks": 1}, True, 1),
    ({"mismatched_blocks": 2, "outcomes": {0: _host.CORRUPT}}, True, 1),
    ({"pool_problems": ("block 4 is in 2 books",)}, True, 1),
    ({"drain_left": 1}, True, 1),
    ({"outcomes": {0: "transfer_timeout"}}, False, 1),  # without faults every request counts
    ({"outcomes": {0: "transfer_timeout"}}, True, 0),  # with faults failures are expected
])
def test_demo_report_exit_code_follows_the_books(changes: dict[str, object], faults: bool,
                                                  code: int) -> None:
    plan = _plan.make_plan(_args("--requests", "1", *(("--faults",) if faults else ())))
    summaries = [_summary(r, **(changes if r == 2 else {})) for r in range(4)]
    out = io.StringIO()
    assert _report.report(plan, summaries, 1.0, out) == code
    text = out.getvalue()
    assert ("OK: no block leaked" in text) == (code == 0)
    if "outcomes" in changes:
        assert "failed: " in text


def test_demo_rank_stops_and_counts_blocks_written_after_their_free() -> None:
    import anyio
    import torch

    plan = _plan.make_plan(_args("--requests", "3", *SMALL[:-1]))
    pool = _backends.make_pool(plan)
    taken = pool.alloc(pool.num_blocks, owner="earlier")
    pool.free(taken, owner="earlier")  # the free list is FIFO: taken[0] is handed out next
    pool.layers[0][taken[0]] = torch.zeros_like(pool.layers[0][taken[0]])  # a late write
    rank = _host.RankHost(plan, 2, pool, None, lambda index: None)  # type: ignore[arg-type]
    anyio.run(rank.run)
    assert rank.outcomes == {0: _host.POISONED}
    assert rank.early_freed == {taken[0]}
