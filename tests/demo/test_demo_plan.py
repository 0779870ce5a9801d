"""`kvhandoff demo`'s plan and its imports: what every rank derives from the options alone,
and the demo staying a client of the public runtime API that ``kvhandoff --help`` can load
without torch."""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from kvhandoff.demo import _plan, command

DEMO_DIR = Path(_plan.__file__).resolve().parent
PUBLIC_RUNTIME = ("kvhandoff.engine", "kvhandoff.engine.transports", "kvhandoff.collectives",
                  "kvhandoff.cuda_ext", "kvhandoff.kvcache")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(("argv", "message"), [
    (("--concurrency", "0"), "--concurrency must be at least 1"),
    (("--torch-threads", "0"), "--torch-threads must be at least 1"),
    (("--block-tokens", "0"), "--block-tokens must be at least 1"),
    (("--layerwise-every", "-1"), "--layerwise-every must be 0 (never) or more"),
    (("--max-tokens", "512", "--blocks", "31"), "--blocks must be at least 32 (one 512-token"),
])
def test_plan_bad_option_raises_value_error_naming_it(argv: tuple[str, ...],
                                                      message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        _plan.make_plan(_args(*argv))


def test_plan_bad_option_exits_2_before_any_rank_starts(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert command.run(_args("--layerwise-every", "-1")) == 2
    captured = capsys.readouterr()
    assert captured.err == "kvhandoff demo: --layerwise-every must be 0 (never) or more\n"
    assert captured.out == ""


def test_plan_blocks_may_be_exactly_one_longest_request() -> None:
    plan = _plan.make_plan(_args("--max-tokens", "512", "--blocks", "32"))
    assert plan.num_blocks == 32
    assert max(r.blocks for r in plan.requests) <= 32


def test_plan_requests_are_numbered_and_named_by_seed_and_index() -> None:
    plan = _plan.make_plan(_args("--requests", "5", "--seed", "3"))
    assert [r.index for r in plan.requests] == [0, 1, 2, 3, 4]
    assert [r.request_id for r in plan.requests] == [f"req-3-{i}" for i in range(5)]


def test_plan_tokens_stay_in_range_and_round_up_to_blocks() -> None:
    plan = _plan.make_plan(_args("--requests", "30", "--min-tokens", "17",
                                 "--max-tokens", "33", "--block-tokens", "16"))
    assert all(17 <= r.tokens <= 33 for r in plan.requests)
    assert {r.blocks for r in plan.requests} <= {2, 3}
    assert all((r.blocks - 1) * 16 < r.tokens <= r.blocks * 16 for r in plan.requests)


def test_plan_equal_min_and_max_tokens_give_one_length() -> None:
    plan = _plan.make_plan(_args("--requests", "6", "--min-tokens", "300",
                                 "--max-tokens", "300"))
    assert {r.tokens for r in plan.requests} == {300}


@pytest.mark.parametrize(("every", "layerwise"), [
    ("0", []), ("1", [0, 1, 2, 3, 4, 5]), ("3", [2, 5]), ("7", []),
])
def test_plan_layerwise_every_picks_every_kth_request(every: str,
                                                      layerwise: list[int]) -> None:
    plan = _plan.make_plan(_args("--requests", "6", "--layerwise-every", every))
    assert [r.index for r in plan.requests if r.layerwise] == layerwise


def test_plan_geometry_is_the_tp_shard() -> None:
    plan = _plan.make_plan(_args("--layers", "4", "--kv-heads", "6", "--head-dim", "64",
                                 "--block-tokens", "8", "--max-tokens", "512", "--faults"))
    assert plan.kv_heads == 3 and plan.layers == 4 and plan.faults
    assert plan.tensor_block_nbytes == 8 * 3 * 64 * 2  # bf16
    assert plan.block_nbytes == 2 * 4 * plan.tensor_block_nbytes  # K and V of every layer


def test_plan_is_the_same_in_another_process() -> None:
    # Under MPI every rank makes the plan on its own: it must not depend on the process.
    here = _plan.make_plan(_args("--requests", "20", "--seed", "11"))
    code = ("import argparse; from kvhandoff.demo import _plan, command; "
            "p = argparse.ArgumentParser(); command.add_arguments(p); "
            "plan = _plan.make_plan(p.parse_args(['--requests', '20', '--seed', '11'])); "
            "print([(r.tokens, r.layerwise) for r in plan.requests])")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60, check=True).stdout.strip()
    assert there == str([(r.tokens, r.layerwise) for r in here.requests])


def test_demo_command_imports_no_heavy_library() -> None:
    # `kvhandoff --help` imports the command module of every subcommand.
    code = ("import sys; import kvhandoff.demo.command; "
            "print(sorted(m for m in ('torch', 'anyio', 'rich', 'mpi4py', 'numpy') "
            "if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True).stdout.strip()
    assert loaded == "[]"


def _kvhandoff_imports(path: Path) -> list[str]:
    """Every kvhandoff module ``path`` imports, and every name it takes from one, dotted
    (``from kvhandoff import cuda_ext`` gives ``kvhandoff.cuda_ext``)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return [name for name in names if name.split(".")[0] == "kvhandoff"]


def test_demo_uses_only_the_public_runtime_api() -> None:
    modules = sorted(DEMO_DIR.glob("*.py"))
    assert {p.name for p in modules} >= {"_plan.py", "_host.py", "_backends.py",
                                         "_report.py", "command.py"}
    outside = {name for path in modules for name in _kvhandoff_imports(path)
               if not name.startswith("kvhandoff.demo.")}
    assert outside, "the demo runs the runtime: it must import some of it"
    for name in sorted(outside):  # a public module, or a public name of one
        module, _, last = name.rpartition(".")
        assert name in PUBLIC_RUNTIME or (module in PUBLIC_RUNTIME and
                                          not last.startswith("_")), name
