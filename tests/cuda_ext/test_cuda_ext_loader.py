"""Loading the compiled block copy: nothing at import, one warning and the torch fallback when
no compiler works, a typed error when the compiled backend is required, and the cache dir."""

from __future__ import annotations

import json
import os
import textwrap
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from kvhandoff.cuda_ext import BlockCopyFallbackWarning, ExtensionUnavailableError, _loader

FALLBACK_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.simplefilter("always")
    import torch
    import kvhandoff.cuda_ext as cuda_ext
    from kvhandoff.cuda_ext import _loader
    built_at_import = _loader._LOADER._attempted
    layers = [torch.arange(24, dtype=torch.float16).view(4, 6) + i for i in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = cuda_ext.gather(layers, [3, 1], torch.empty(72, dtype=torch.uint8)).clone()
        second = cuda_ext.gather(layers, [3, 1], torch.empty(72, dtype=torch.uint8)).clone()
        active = cuda_ext.backend("cpu")
    ref = cuda_ext.gather_ref(layers, [3, 1], torch.empty(72, dtype=torch.uint8))
    print(json.dumps({
        "built_at_import": built_at_import,
        "warnings": [[w.category.__name__, str(w.message), w.filename] for w in caught],
        "same": bool(torch.equal(first, ref) and torch.equal(second, ref)),
        "backend": active,
    }))
    """
)


def run_fallback_script(
    run_python: Callable[..., object], tmp_path: Path, env: dict[str, str]
) -> dict:
    script = tmp_path / "fallback.py"
    script.write_text(FALLBACK_SCRIPT)
    full_env = {"KVHANDOFF_CACHE_DIR": str(tmp_path / "cache"), **env}
    result = run_python([str(script)], timeout=120, env=full_env)
    assert result.returncode == 0, result.stdout
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_block_copy_without_compiler_warns_once_and_matches_reference(
    run_python: Callable[..., object], tmp_path: Path
) -> None:
    report = run_fallback_script(
        run_python, tmp_path, {"CXX": "kvhandoff-no-such-compiler", "KVHANDOFF_BLOCK_COPY": ""}
    )
    assert report["built_at_import"] is False
    assert report["same"] is True
    assert report["backend"] == "torch"
    assert len(report["warnings"]) == 1
    category, message, filename = report["warnings"][0]
    assert category == "BlockCopyFallbackWarning"
    assert "kvhandoff-no-such-compiler" in message and "KVHANDOFF_BLOCK_COPY=torch" in message
    assert filename.endswith("fallback.py")  # blamed on the caller, not on our internals


def test_block_copy_env_torch_never_builds(
    run_python: Callable[..., object], tmp_path: Path
) -> None:
    report = run_fallback_script(
        run_python, tmp_path, {"CXX": "kvhandoff-no-such-compiler", "KVHANDOFF_BLOCK_COPY": "torch"}
    )
    assert report == {"built_at_import": False, "warnings": [], "same": True, "backend": "torch"}
    assert not (tmp_path / "cache").exists()


def test_loader_build_failure_warns_once_with_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXX", "false")  # a "compiler" that exists and always fails
    loader = _loader.ExtensionLoader(cache_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert loader.load() is None
        assert loader.load() is None
    assert len(caught) == 1
    assert caught[0].category is BlockCopyFallbackWarning
    message = str(caught[0].message)
    assert str(tmp_path) in message and "KVHANDOFF_BLOCK_COPY=cpp" in message
    assert loader.failure is not None and "failed" in loader.failure
    with pytest.raises(ExtensionUnavailableError) as info:
        loader.load(required=True)  # the required mode carries the build's own error text
    assert len(info.value.reason) > len(loader.failure)


def test_loader_required_raises_typed_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXX", "kvhandoff-no-such-compiler")
    loader = _loader.ExtensionLoader(cache_dir=tmp_path)
    for _ in range(2):  # the cached failure is raised again, never silently ignored
        with pytest.raises(ExtensionUnavailableError) as info:
            loader.load(required=True)
        assert "kvhandoff-no-such-compiler" in info.value.reason


def test_loader_removes_stale_build_lock_only(tmp_path: Path) -> None:
    fresh, stale = tmp_path / "fresh", tmp_path / "stale"
    for build_dir in (fresh, stale):
        build_dir.mkdir()
        (build_dir / "lock").touch()
    old = time.time() - _loader.STALE_LOCK_S - 60
    os.utime(stale / "lock", (old, old))
    _loader._clear_stale_lock(fresh)
    _loader._clear_stale_lock(stale)
    _loader._clear_stale_lock(tmp_path / "missing")
    assert (fresh / "lock").exists() and not (stale / "lock").exists()


def test_loader_cache_dir_is_per_user_and_per_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(_loader.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _loader.default_cache_dir() == (
        tmp_path / "xdg" / "kvhandoff" / "torch_extensions" / torch.__version__
    )
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert _loader.default_cache_dir() == (
        Path.home() / ".cache" / "kvhandoff" / "torch_extensions" / torch.__version__
    )
    monkeypatch.setenv(_loader.CACHE_ENV, str(tmp_path / "mine"))
    assert _loader.default_cache_dir() == tmp_path / "mine"


def test_loader_build_name_tracks_sources_and_cuda() -> None:
    cpu, cuda = _loader._build_name(False), _loader._build_name(True)
    assert cpu.startswith("kvhandoff_block_copy_cpu_")
    assert cuda.startswith("kvhandoff_block_copy_cuda_")
    assert cpu.split("_")[-1] != cuda.split("_")[-1]
    assert _loader._build_name(False) == cpu  # stable: a second process reuses the build
