"""The installed layout: a `kvhandoff` namespace with its seven subpackages (the runtime:
sessions, collectives, cuda_ext, engine; on top of it: analysis, demo, cli), nothing else at
the top of site-packages, a working console script and ``python -m kvhandoff.cli``, and each
package's ``__all__`` naming exactly what it exports."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("sessions", "collectives", "cuda_ext", "engine", "kvcache", "analysis", "demo",
               "scenarios", "cli")
# Every package, nested ones included; the __all__ check runs on those that define one.
PACKAGES = (*SUBPACKAGES, "engine.transports")


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


def test_console_script_is_the_cli_main() -> None:
    (script,) = entry_points(group="console_scripts", name="kvhandoff")
    assert script.value == "kvhandoff.cli:main"


def test_console_script_version() -> None:
    exe = Path(sys.executable).parent / "kvhandoff"
    assert exe.exists(), "the kvhandoff console script is not installed"
    result = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("kvhandoff ")


def test_python_m_kvhandoff_cli_is_the_console_script(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "kvhandoff"
    outputs = []
    for cmd in ([sys.executable, "-m", "kvhandoff.cli"], [str(exe)]):
        for args in (["--version"], ["--help"]):
            result = subprocess.run([*cmd, *args], cwd=tmp_path, capture_output=True,
                                    text=True, timeout=120)
            assert result.returncode == 0, (cmd, args, result.stderr)
            outputs.append(result.stdout)
    m_version, m_help, exe_version, exe_help = outputs
    assert m_version.startswith("kvhandoff ") and m_version == exe_version
    assert m_help == exe_help
    for command in ("demo", "analyze", "trace", "scenario"):
        assert command in m_help


def _is_export(attr: str, value: object) -> bool:
    """A public name a package binds for its users: not a submodule, nor ``annotations``
    (``from __future__``) or a typing helper it imported for itself."""
    return not (
        attr.startswith("_") or attr in ("annotations", "TYPE_CHECKING")
        or isinstance(value, types.ModuleType)
        or getattr(value, "__module__", None) == "typing"
    )


@pytest.mark.parametrize("name", PACKAGES)
def test_package_all_matches_public_names(name: str) -> None:
    package = importlib.import_module(f"kvhandoff.{name}")
    if not hasattr(package, "__all__"):
        pytest.skip(f"kvhandoff.{name} defines no __all__")
    assert len(set(package.__all__)) == len(package.__all__), "__all__ lists a name twice"
    missing = [attr for attr in package.__all__ if not hasattr(package, attr)]
    assert not missing, f"in __all__ but not exported: {missing}"
    # dir() includes what a lazy module ``__getattr__`` serves when the package lists it in
    # its ``__dir__``. A public submodule may be listed in __all__ or not.
    public = {attr for attr in dir(package) if _is_export(attr, getattr(package, attr))}
    listed = {attr for attr in package.__all__
              if not isinstance(getattr(package, attr), types.ModuleType)}
    assert not public - listed, f"exported but not in __all__: {sorted(public - listed)}"
    assert not listed - public, f"in __all__ but not an export: {sorted(listed - public)}"


@pytest.mark.timeout(300)
def test_wheel_layout(tmp_path: Path) -> None:
    """A built wheel holds only kvhandoff/<subpackage>/..., with py.typed and the C++/CUDA
    sources, and no top-level engine/, sessions/ or cli/."""
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
    assert "kvhandoff/engine/transports/__init__.py" in names
    assert "kvhandoff/cli/__main__.py" in names
    assert any(n.startswith("kvhandoff/cuda_ext/csrc/") and n.endswith(".cu") for n in names)
    assert any(n.startswith("kvhandoff/cuda_ext/csrc/") and n.endswith(".cpp") for n in names)
