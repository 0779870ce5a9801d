"""tests/gpu/gpu_check.py on the CPU: without a GPU it says so, runs nothing, writes nothing
and exits 0; its parsers and summary writer, on output recorded from real runs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "gpu_check.py"

# Recorded on the 2-core CPU VM of this project, 2026-12-01:
# `python benchmarks/bench_block_copy.py --quick --rounds 2 --device all` (CPU figures; the
# parser reads any device's section the same way); the block-to-block table from
# `... --part blocks --quick --rounds 2 --device all` of the same day.
BENCH_OUTPUT = """\
# bench_block_copy 2026-12-01 | x86_64 | 2 torch threads | Python 3.11.7 | torch 2.13.0+cpu

## cpu: backend 'cpp', best of 2 rounds
| case | tensors x blocks x bytes | moved | ours gather GB/s | copy GB/s | gather vs copy \
| gather vs loop | scatter vs loop |
|---|---|---|---|---|---|---|---|
| headline | 32 x 512 x 16384 | 256.0 MiB | 12.75 | 13.03 | 0.98 | 1.04 | 4.27 |
| sweep | 32 x 8192 x 256 | 64.0 MiB | 10.41 | 14.10 | 0.74 | 0.97 | 3.52 |
| sweep | 32 x 2048 x 1024 | 64.0 MiB | 11.17 | 14.27 | 0.78 | 0.87 | 4.73 |
| sweep | 32 x 1024 x 2048 | 64.0 MiB | 10.46 | 13.47 | 0.78 | 0.81 | 5.27 |
| sweep | 32 x 128 x 16384 | 64.0 MiB | 13.65 | 13.55 | 1.01 | 1.04 | 5.40 |
| sweep | 32 x 32 x 65536 | 64.0 MiB | 14.56 | 13.37 | 1.09 | 1.52 | 5.44 |
| sweep | 32 x 2 x 1048576 | 64.0 MiB | 15.08 | 13.27 | 1.14 | 1.18 | 5.22 |
| few | 2 x 1 x 8388608 | 16.0 MiB | 25.51 | 21.55 | 1.18 | 0.96 | 7.00 |
| request | 64 x 16 x 2048 | 2.0 MiB | 32.24 | 51.97 | 0.62 | 4.34 | 20.63 |
| request | 64 x 4 x 512 | 0.1 MiB | 11.94 | 39.38 | 0.30 | 12.00 | 20.53 |

## cpu block to block: backend 'cpp', best of 2 rounds, ids scattered over pools 4x larger
| case | blocks x bytes (tensors x bytes) | moved | loopback GB/s | memcpy GB/s \
| loopback vs memcpy | copy_blocks vs memcpy | loopback vs index ops |
|---|---|---|---|---|---|---|---|
| 512 KiB blocks | 32 x 512 KiB (16 x 32768) | 16.0 MiB | 0.99 | 1.15 | 0.86 | 0.92 | 12.98 |
| 4 KiB blocks | 4096 x 4 KiB (16 x 256) | 16.0 MiB | 0.85 | 1.05 | 0.81 | 1.44 | 7.03 |

## cuda: skipped (torch sees no GPU)
"""

# pytest's last lines, as pytest 9 prints them (the first recorded here from
# `pytest tests/gpu/test_gpu_engine.py -q`; the second shows the format of a failed run).
PYTEST_PASSED = "..ss.s..ss.s                     [100%]\n6 passed, 6 skipped in 5.93s\n"
PYTEST_FAILED = "FAILED tests/x.py::test_a - AssertionError\n1 failed, 2 passed, 1 error in 3.1s\n"


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a GPU")
def test_gpu_check_without_gpu_says_so_and_exits_0(
    run_python: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path,
) -> None:
    out = tmp_path / "summary.md"
    result = run_python([str(SCRIPT), "--out", str(out)], timeout=120)
    assert result.returncode == 0, result.stdout
    assert "no CUDA GPU" in result.stdout and "Nothing was run" in result.stdout
    assert not out.exists() and not list(tmp_path.iterdir())


def test_gpu_check_parses_pytest_counts(gpu_check: ModuleType) -> None:
    assert gpu_check.parse_pytest_counts(PYTEST_PASSED) == {"passed": 6, "skipped": 6}
    assert gpu_check.parse_pytest_counts(PYTEST_FAILED) == {"failed": 1, "passed": 2,
                                                            "errors": 1}
    assert gpu_check.parse_pytest_counts("Traceback (most recent call last):\n") == {}


def test_gpu_check_pytest_step_passes_only_with_passed_tests(gpu_check: ModuleType) -> None:
    step = gpu_check.StepOutput
    assert gpu_check.pytest_check("t", step(0, 6.0, PYTEST_PASSED)).status == "pass"
    failed = gpu_check.pytest_check("t", step(1, 3.1, PYTEST_FAILED))
    assert failed.status == "fail" and "1 failed" in failed.detail and failed.output_tail
    all_skipped = gpu_check.pytest_check("t", step(0, 1.0, "sss\n3 skipped in 1.00s\n"))
    assert all_skipped.status == "fail"
    hung = gpu_check.pytest_check("t", step(None, 120.0, "..."))
    assert hung.status == "fail" and "time limit" in hung.detail


def test_gpu_check_parses_bench_section_of_one_device(gpu_check: ModuleType) -> None:
    cpu = gpu_check.parse_bench(BENCH_OUTPUT, "cpu")
    assert (cpu.backend, cpu.skipped, len(cpu.rows)) == ("cpp", None, 10)
    assert cpu.header == "cpu: backend 'cpp', best of 2 rounds"
    headline = cpu.rows[0]
    assert (headline.case, headline.shape, headline.moved) == (
        "headline", "32 x 512 x 16384", "256.0 MiB")
    assert headline.figures == {"ours gather GB/s": 12.75, "copy GB/s": 13.03,
                                "gather vs copy": 0.98, "gather vs loop": 1.04,
                                "scatter vs loop": 4.27}
    cuda = gpu_check.parse_bench(BENCH_OUTPUT, "cuda")
    assert cuda.rows == [] and cuda.skipped == "skipped (torch sees no GPU)"


def test_gpu_check_holds_bench_rows_to_the_goals(gpu_check: ModuleType) -> None:
    cpu = gpu_check.parse_bench(BENCH_OUTPUT, "cpu")
    checks = {check.name: check for check in gpu_check.bench_checks(cpu)}
    copy_goal, loop_goal = (name for name, *_ in gpu_check.GOALS)
    assert checks[copy_goal].status == "pass"  # 0.98 >= 0.9
    assert "32 x 512 x 16384: 0.98" in checks[copy_goal].detail
    assert checks[loop_goal].status == "pass"  # 4.34 and 12.00 >= 3
    cpu.rows[-1].figures["gather vs loop"] = 2.5
    assert {c.name: c.status for c in gpu_check.bench_checks(cpu)}[loop_goal] == "fail"
    missing = gpu_check.bench_checks(gpu_check.parse_bench(BENCH_OUTPUT, "cuda"))
    assert [c.status for c in missing] == ["fail", "fail"]
    assert "torch sees no GPU" in missing[0].detail


def test_gpu_check_cuda_rows_on_another_backend_fail(gpu_check: ModuleType) -> None:
    as_cuda = BENCH_OUTPUT.replace("## cuda: skipped (torch sees no GPU)\n", "").replace(
        "## cpu: backend 'cpp'", "## cuda: backend 'torch'")
    checks = gpu_check.bench_checks(gpu_check.parse_bench(as_cuda, "cuda"))
    assert checks[-1].status == "fail" and "'torch'" in checks[-1].detail


def test_gpu_check_build_step_needs_the_cuda_backend(gpu_check: ModuleType) -> None:
    step = gpu_check.StepOutput
    assert gpu_check.build_check(step(0, 60.0, "with_cuda True\nbackend cuda\n")).status == "pass"
    cpu_only = gpu_check.build_check(step(0, 30.0, "with_cuda False\nbackend cpp\n"))
    assert cpu_only.status == "fail" and "with_cuda False" in cpu_only.detail


def test_gpu_check_summary_lists_machine_checks_figures_and_failures(
    gpu_check: ModuleType,
) -> None:
    check = gpu_check.Check
    checks = [check("build the extension with CUDA", "pass", "with CUDA", 61.2),
              check("CUDA tests (pytest -m cuda)", "fail", "exit 1: 1 failed", 40.0,
                    "FAILED tests/x.py::test_a"),
              check("TorchDistTransport over NCCL", "skipped", "1 GPU: NCCL refuses two ranks")]
    machine = {"GPU": "1 x NVIDIA H200", "driver": "570.00", "torch": "2.x, CUDA 12.x"}
    bench = gpu_check.parse_bench(BENCH_OUTPUT, "cpu")
    text = gpu_check.render_summary(machine, checks, bench, "2026-12-01")
    assert text.startswith("### GPU check, 2026-12-01\n")
    assert "**1 of 3 checks failed**: CUDA tests (pytest -m cuda)." in text
    assert "| driver | 570.00 |" in text
    assert "| build the extension with CUDA | PASS | 61.2 s | with CUDA |" in text
    assert "| TorchDistTransport over NCCL | SKIPPED |  | 1 GPU: NCCL refuses two ranks |" in text
    assert "| headline | 32 x 512 x 16384 | 256.0 MiB | 12.75 | 13.03 | 0.98 | 1.04 | 4.27 |" \
        in text
    assert "FAILED tests/x.py::test_a" in text and "<details>" in text
    passing = gpu_check.render_summary(machine, checks[:1], None, "2026-12-01")
    assert "**All 1 checks passed** (0 skipped)." in passing and "<details>" not in passing


def test_gpu_check_parses_the_block_to_block_table_apart(gpu_check: ModuleType) -> None:
    blocks = gpu_check.parse_blocks(BENCH_OUTPUT, "cpu")
    assert (blocks.backend, blocks.skipped, len(blocks.rows)) == ("cpp", None, 2)
    assert blocks.header.startswith("cpu block to block: backend 'cpp', best of 2 rounds")
    first = blocks.rows[0]
    assert (first.case, first.shape, first.moved) == (
        "512 KiB blocks", "32 x 512 KiB (16 x 32768)", "16.0 MiB")
    assert first.figures == {"loopback GB/s": 0.99, "memcpy GB/s": 1.15,
                             "loopback vs memcpy": 0.86, "copy_blocks vs memcpy": 0.92,
                             "loopback vs index ops": 12.98}
    assert len(gpu_check.parse_bench(BENCH_OUTPUT, "cpu").rows) == 10  # tables kept apart
    cuda = gpu_check.parse_blocks(BENCH_OUTPUT, "cuda")
    assert cuda.rows == [] and cuda.skipped == "skipped (torch sees no GPU)"


def test_gpu_check_holds_block_rows_to_their_goal(gpu_check: ModuleType) -> None:
    blocks = gpu_check.parse_blocks(BENCH_OUTPUT, "cpu")
    (goal,) = (name for name, *_ in gpu_check.BLOCK_GOALS)
    checks = {c.name: c for c in gpu_check.bench_checks(blocks, gpu_check.BLOCK_GOALS)}
    assert checks[goal].status == "pass"  # 0.92 >= 0.9
    assert "32 x 512 KiB (16 x 32768): 0.92" in checks[goal].detail
    blocks.rows[0].figures["copy_blocks vs memcpy"] = 0.85
    assert gpu_check.bench_checks(blocks, gpu_check.BLOCK_GOALS)[0].status == "fail"
    missing = gpu_check.bench_checks(gpu_check.parse_blocks(BENCH_OUTPUT, "cuda"),
                                     gpu_check.BLOCK_GOALS)
    assert [c.status for c in missing] == ["fail"] and "torch sees no GPU" in missing[0].detail


def test_gpu_check_summary_shows_both_block_copy_tables(gpu_check: ModuleType) -> None:
    bench = gpu_check.parse_bench(BENCH_OUTPUT, "cpu")
    blocks = gpu_check.parse_blocks(BENCH_OUTPUT, "cpu")
    text = gpu_check.render_summary({"GPU": "none"}, [], bench, "2026-12-01", blocks)
    assert "| case | shape | moved | loopback GB/s | memcpy GB/s | loopback vs memcpy | " \
        "copy_blocks vs memcpy | loopback vs index ops |" in text
    assert "| 4 KiB blocks | 4096 x 4 KiB (16 x 256) | 16.0 MiB | 0.85 | 1.05 | 0.81 | 1.44 " \
        "| 7.03 |" in text
    assert "| headline | 32 x 512 x 16384 | 256.0 MiB |" in text
