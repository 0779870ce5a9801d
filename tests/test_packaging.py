"""The installed layout: a `kvhandoff` namespace with the four subpackages, nothing else at
the top of site-packages, a working console script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("sessions", "collectives", "cuda_ext", "engine")


def test_subpackages_import_from_outside_repo(tmp_path: Path) -> None:
    code = (
        "import importlib, kvhandoff, sys\n"
        f"for name in {SUBPACKAGES!r}:\n"
        "    mod = importlib.import_module('kvhandoff.' + name)\n"
        "    print(name, mod.__file__)\n"
        f"for name in {SUBPACKAGES!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        pass\n"
        "    else:\n"
        "        sys.exit('top-level ' + name + ' importable')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for name in SUBPACKAGES:
        assert f"{name} " in result.stdout


def test_console_script_version() -> None:
    exe = Path(sys.executable).parent / "kvhandoff"
    assert exe.exists(), "the kvhandoff console script is not installed"
    result = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("kvhandoff ")


@pytest.mark.timeout(300)
def test_wheel_layout(tmp_path: Path) -> None:
    """A built wheel holds only kvhandoff/<subpackage>/..., with py.typed and the C++/CUDA
    sources, and no top-level engine/ or sessions/."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
         str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=280,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = tmp_path.glob("kvhandoff-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"kvhandoff"}, top
    assert "kvhandoff/__init__.py" not in names  # PEP 420 namespace
    for name in SUBPACKAGES:
        assert f"kvhandoff/{name}/__init__.py" in names
        assert f"kvhandoff/{name}/py.typed" in names
    assert any(n.startswith("kvhandoff/cuda_ext/csrc/") and n.endswith(".cu") for n in names)
    assert any(n.startswith("kvhandoff/cuda_ext/csrc/") and n.endswith(".cpp") for n in names)
