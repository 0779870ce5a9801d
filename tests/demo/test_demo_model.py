"""`kvhandoff demo --model`: a random-initialised Llama's KV moved layer by layer from the
prefill ranks to the decode ranks, embedded and under mpiexec, checked against decoding in
one place (KV bytes and greedy tokens) with a negative control; and the demo's own checks
catching a swapped block order."""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
from pathlib import Path

import pytest
from conftest import _run_with_timeout, find_mpiexec
from kvhandoff.demo import _model, command

EXE = Path(sys.executable).parent / "kvhandoff"
# Prompts of 20..90 tokens over 16-token blocks: most end inside a block.
SMALL = ("--model", "--requests", "3", "--min-tokens", "20", "--max-tokens", "90",
         "--decode-steps", "6", "--no-progress")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


def _row(out: str, label: str) -> str:
    match = re.search(rf"{re.escape(label)}\s*│\s*([^│]+?)\s*│", out)
    assert match is not None, f"no {label!r} row in:\n{out}"
    return match.group(1)


def _assert_clean_run(out: str, requests: int = 3) -> None:
    assert _row(out, "requests ok") == f"{requests}/{requests}", out
    assert _row(out, "leaked blocks") == "0" and _row(out, "sessions left after drain") == "0"
    assert "failed:" not in out
    assert "OK: every request's KV bytes and greedy tokens matched" in out
    compared = float(_row(out, "KV bytes compared on decode").split()[0])
    assert compared > 0


def test_model_plan_is_seeded_and_refuses_bad_options() -> None:
    plan = _model.make_model_plan(_args(*SMALL))
    again = _model.make_model_plan(_args(*SMALL))
    assert plan == again and len(plan.requests) == 3
    assert all(20 <= r.tokens <= 90 for r in plan.requests)
    for bad, option in ((("--decode-steps", "0"), "--decode-steps"),
                        (("--min-tokens", "100"), "--min-tokens")):
        with pytest.raises(ValueError, match=option):
            _model.make_model_plan(_args(*SMALL, *bad))


def test_model_demo_refuses_the_nixl_backend(capsys: pytest.CaptureFixture[str]) -> None:
    assert command.run(_args(*SMALL, "--backend", "nixl")) == 2
    assert "--model runs embedded or with --backend mpi" in capsys.readouterr().err


def test_model_demo_without_transformers_names_the_extra(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
    assert command.run(_args(*SMALL)) == 2
    assert "pip install 'kvhandoff[hf]'" in capsys.readouterr().err


def _need_transformers() -> None:
    pytest.importorskip("transformers", reason="the hf extra is not installed")


def test_model_demo_embedded_matches_decoding_in_one_place() -> None:
    _need_transformers()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = _run_with_timeout([str(EXE), "demo", *SMALL], 240.0, env)
    assert result.returncode == 0, result.stdout
    _assert_clean_run(result.stdout)


def test_model_demo_catches_a_swapped_block_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's own check is not vacuous: a decode rank that reads its blocks in a swapped
    order (the first two of the table exchanged) sees the KV bytes differ, and the run fails
    (exit 1) naming ``kv_mismatch``."""
    _need_transformers()
    import kvhandoff.kvcache as kvcache

    real = kvcache.read_cache

    def swapped(pool, block_ids, num_tokens, **kw):  # type: ignore[no-untyped-def]
        ids = list(block_ids)
        ids[0], ids[1] = ids[1], ids[0]
        return real(pool, ids, num_tokens, **kw)

    monkeypatch.setattr(kvcache, "read_cache", swapped)
    args = _args("--model", "--requests", "2", "--min-tokens", "40", "--max-tokens", "60",
                 "--decode-steps", "4", "--no-progress")
    plan = _model.make_model_plan(args)
    summaries, seconds = _model.run_embedded(plan)
    out = io.StringIO()
    assert _model.report(plan, summaries, seconds, out) == 1
    assert _row(out.getvalue(), "failed: kv_mismatch") == "2"
    assert _row(out.getvalue(), "leaked blocks") == "0"


def test_model_demo_under_mpiexec_matches_decoding_in_one_place() -> None:
    _need_transformers()
    pytest.importorskip("mpi4py")
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found: install with `pip install kvhandoff[mpi]`")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = _run_with_timeout([mpiexec, "-n", "4", str(EXE), "demo", "--backend", "mpi",
                                *SMALL], 300.0, env)
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("requests ok") == 1  # only rank 0 reports
    _assert_clean_run(result.stdout)
