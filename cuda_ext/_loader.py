"""The one module that builds and loads the compiled block copy extension.

Nothing happens at import: the first ``gather``/``scatter``/``backend`` call JIT-builds
``csrc/`` with ``torch.utils.cpp_extension.load`` and ninja into a per-user cache directory
(about 35 s on a 2-core machine; later processes load the cached build in well under a
second). The CUDA kernel is linked in only when torch sees a GPU and ``CUDA_HOME`` is set.

Environment:

- ``KVHANDOFF_BLOCK_COPY``: ``auto`` (default: the extension if it builds, else torch with one
  :class:`BlockCopyFallbackWarning`), ``torch`` (never build; use the torch reference) or
  ``cpp`` (require the extension; raise :class:`ExtensionUnavailableError` instead of falling
  back). Read on every call, so it can change at run time.
- ``KVHANDOFF_CACHE_DIR``: where builds go; default
  ``${XDG_CACHE_HOME:-~/.cache}/kvhandoff/torch_extensions/<torch version>``. Each build gets a
  subdirectory named after a hash of the sources, their folder, the torch version and the CUDA
  setting, so a changed source or torch never loads a stale build (and two checkouts never
  rebuild each other's). Concurrent processes (MPI ranks) share one
  build: torch's file lock makes the others wait for the first.
- ``CXX``: the C++ compiler torch uses (default ``c++``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from types import FrameType, ModuleType

import torch

from .errors import BlockCopyConfigError, BlockCopyFallbackWarning, ExtensionUnavailableError

BACKEND_ENV = "KVHANDOFF_BLOCK_COPY"
CACHE_ENV = "KVHANDOFF_CACHE_DIR"
MODES = ("auto", "torch", "cpp")
_PACKAGE_DIR = str(Path(__file__).resolve().parent)
CSRC = Path(_PACKAGE_DIR) / "csrc"
_CPU_SOURCES = ("block_copy.cpp",)
_CUDA_SOURCES = ("block_copy_cuda_host.cpp", "block_copy_cuda.cu")
STALE_LOCK_S = 900.0  # a build takes well under a minute; a lock this old has no owner
_HASHED = (
    "block_copy.cpp", "block_copy_cuda_host.cpp", "block_copy_cuda.cu", "block_copy.h",
    "block_copy_host.h",
)


def mode() -> str:
    """The requested mode from ``KVHANDOFF_BLOCK_COPY`` (``auto`` when unset or empty)."""
    value = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if value not in MODES:
        raise BlockCopyConfigError(BACKEND_ENV, value, MODES)
    return value


def default_cache_dir() -> Path:
    """``$KVHANDOFF_CACHE_DIR``, else the per-user default described in the module doc."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvhandoff" / "torch_extensions" / torch.__version__


def _cuda_wanted() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.cuda.is_available() and CUDA_HOME is not None


# at::parallel_for is inline OpenMP in torch's headers (its CPU builds use the OpenMP backend):
# without -fopenmp the CPU kernel would silently run on one thread.
_CFLAGS = ("-O3", "-fopenmp")
_LDFLAGS = ("-fopenmp",)


def _build_name(with_cuda: bool) -> str:
    digest = hashlib.sha256()
    digest.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    for name in _HASHED:
        digest.update((CSRC / name).read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(b"cuda" if with_cuda else b"cpu")
    # ninja's build file names the sources by absolute path: two checkouts of the same
    # sources must not share a build folder, or each rebuilds the other's every time.
    digest.update(str(CSRC.resolve()).encode())
    flavour = "cuda" if with_cuda else "cpu"
    return f"kvhandoff_block_copy_{flavour}_{digest.hexdigest()[:12]}"


def _clear_stale_lock(build_dir: Path) -> None:
    """Remove torch's build lock when it is far older than any build: a process killed while
    building leaves it behind, and torch would then wait for it forever."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        lock.unlink(missing_ok=True)


def _outside_stacklevel() -> int:
    """The ``stacklevel`` that blames the first caller outside this package, so the warning
    points at the user's ``gather``/``scatter``/``backend`` call whatever path led to it."""
    level = 2  # 1 would be warn_once itself
    frame: FrameType | None = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level


class ExtensionLoader:
    """Builds (once) and holds the compiled extension for one process.

    ``load()`` returns the module, or None after a failure; the failure is cached (no retry in
    the same process) and reported by exactly one warning, or raised as
    :class:`ExtensionUnavailableError` each time when ``required``.
    """

    def __init__(self, cache_dir: Path | None = None):
        self._cache_dir = cache_dir
        self._lock = threading.Lock()
        self._attempted = False
        self._module: ModuleType | None = None
        self._failure: str | None = None
        self._build_output: str | None = None  # the full build error, for required mode
        self._warned: set[str] = set()

    @property
    def failure(self) -> str | None:
        """Why the last build failed (None when it succeeded or was never tried)."""
        return self._failure

    def load(self, *, required: bool = False) -> ModuleType | None:
        """The extension module, building it on the first call."""
        if not self._attempted:
            with self._lock:
                if not self._attempted:
                    self._module, self._failure = self._build()
                    self._attempted = True
        if self._module is None:
            reason = self._failure or "unknown failure"
            if required:
                if self._build_output:
                    # The last lines of the compiler output hold the actual error.
                    reason += "\n" + self._build_output[-4000:]
                raise ExtensionUnavailableError(reason)
            self.warn_once(
                "build",
                f"kvhandoff block copy falls back to torch (slower, same results): {reason}. "
                f"Set {BACKEND_ENV}=torch to silence this warning.",
            )
        return self._module

    def warn_once(self, key: str, message: str) -> None:
        """Issue a :class:`BlockCopyFallbackWarning` the first time ``key`` is seen."""
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        warnings.warn(message, BlockCopyFallbackWarning, stacklevel=_outside_stacklevel())

    def _build(self) -> tuple[ModuleType | None, str | None]:
        from torch.utils import cpp_extension

        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            return None, (
                f"no C++ compiler ({compiler!r} is not on PATH); install one "
                "(e.g. `apt-get install g++`) or point CXX at it"
            )
        if not cpp_extension.is_ninja_available():
            return None, "ninja is not installed; install it with `pip install ninja`"
        with_cuda = _cuda_wanted()
        name = _build_name(with_cuda)
        build_dir = (self._cache_dir or default_cache_dir()) / name
        sources = [str(CSRC / s) for s in _CPU_SOURCES]
        cflags = list(_CFLAGS)
        if with_cuda:
            sources += [str(CSRC / s) for s in _CUDA_SOURCES]
            cflags.append("-DKVHANDOFF_WITH_CUDA")
        try:
            build_dir.mkdir(parents=True, exist_ok=True)
            _clear_stale_lock(build_dir)
            module = cpp_extension.load(
                name=name,
                sources=sources,
                extra_cflags=cflags,
                extra_cuda_cflags=["-O3"],
                extra_include_paths=[str(CSRC)],
                extra_ldflags=list(_LDFLAGS),
                build_directory=str(build_dir),
                with_cuda=with_cuda,
                verbose=False,
            )
        except Exception as exc:  # any build/load failure means "fall back", reported once
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self._build_output = str(exc)
            return None, (
                f"building the extension in {build_dir} failed ({first_line}); run with "
                f"{BACKEND_ENV}=cpp to see the compiler output, fix the compiler or ninja "
                "install, or delete that directory if it is stale"
            )
        return module, None


_LOADER = ExtensionLoader()


def extension(*, required: bool = False) -> ModuleType | None:
    """The process-wide extension module (built on first use), or None when it is not
    available (warned once) and not ``required``."""
    return _LOADER.load(required=required)


def warn_once(key: str, message: str) -> None:
    """A :class:`BlockCopyFallbackWarning` issued at most once per process for ``key``."""
    _LOADER.warn_once(key, message)
