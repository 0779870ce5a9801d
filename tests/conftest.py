"""Shared fixtures: spawning multi-process jobs that can never hang the test run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
MPI_SCRIPTS = TESTS_DIR / "mpi_scripts"
TORCH_SCRIPTS = TESTS_DIR / "torch_scripts"


def find_mpiexec() -> str | None:
    """mpiexec from the MPI wheel sits next to the interpreter; fall back to PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec")


def _run_with_timeout(
    cmd: Sequence[str], timeout: float, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (all ranks)."""
    proc = subprocess.Popen(
        list(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout}s; output:\n{out}")
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, None)


RunMPI = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_mpi() -> RunMPI:
    """``run_mpi(n, "script.py", *args, timeout=60, check=True)`` runs a script from
    tests/mpi_scripts under ``mpiexec -n n`` (``launcher_args``: more mpiexec options, e.g.
    ``["-disable-auto-cleanup"]``). Every rank aborts the job on failure (see _harness.py),
    and the whole process group is killed at the timeout."""
    pytest.importorskip("mpi4py")
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found: install with `pip install kvhandoff[mpi]`")

    def run(n: int, script: str, *args: str, timeout: float = 60.0, check: bool = True,
            env: dict[str, str] | None = None,
            launcher_args: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(MPI_SCRIPTS), full_env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
        if env:
            full_env.update(env)
        cmd = [mpiexec, *launcher_args, "-n", str(n), sys.executable,
               str(MPI_SCRIPTS / script), *args]
        result = _run_with_timeout(cmd, timeout, full_env)
        if check and result.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {result.returncode}; output:\n{result.stdout}")
        return result

    return run


@pytest.fixture
def run_python() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_python(args, timeout=60)`` runs ``python *args`` in its own process group with a
    timeout (used for torch.distributed jobs spawned from tests)."""

    def run(args: Sequence[str], timeout: float = 60.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            full_env.update(env)
        return _run_with_timeout([sys.executable, *args], timeout, full_env)

    return run


RunTorch = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_torch(run_python: Callable[..., subprocess.CompletedProcess[str]]) -> RunTorch:
    """``run_torch("script.py", *args, timeout=60, check=True)`` runs a torch.distributed
    launcher from tests/torch_scripts (the scripts start their own ranks through
    _harness.py: a failing rank reports once and the others are terminated), with the
    process group killed at the timeout. Subfolders of tests/ need not know where the
    scripts live."""
    pytest.importorskip("torch.distributed")

    def run(script: str, *args: str, timeout: float = 60.0, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [str(TORCH_SCRIPTS / script), *args]
        result = run_python(cmd, timeout=timeout, env=env)
        if check and result.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {result.returncode}; output:\n{result.stdout}")
        return result

    return run
