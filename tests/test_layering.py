"""The import arrows between kvhandoff's packages, checked statically (an AST scan of the
library source: nothing is imported, so a broken or heavy module cannot hide a violation).

The arrows:

- ``sessions``, ``collectives`` and ``cuda_ext`` import no other kvhandoff package;
- ``engine`` may import ``sessions``, ``collectives`` and ``cuda_ext``, public names only;
- ``analysis`` (offline log tools) imports no runtime package and neither torch nor anyio;
- ``demo`` may import the runtime and ``analysis``; ``cli`` may import all of them, and
  nothing but ``cli`` imports ``cli`` or ``demo``;
- ``sessions`` (the sans-I/O core) imports no torch, anyio, numpy or mpi4py, not even lazily;
- no package imports a private module (a path component starting with ``_``) or a private
  name of another top-level package, nor a name that module's ``__all__`` leaves out (when
  it has one); within one package anything goes;
- mpi4py, an optional dependency, is imported only inside functions: a machine without MPI
  must be able to import every module.

An import is an ``import`` or ``from ... import`` statement (relative ones resolved), an
``importlib.import_module`` / ``__import__`` call with a string literal, and, in a module that
calls one of those with a computed name (a lazy-import table), every string literal naming a
module of a kvhandoff package.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
NAMESPACE = "kvhandoff"
RUNTIME = frozenset({"sessions", "collectives", "cuda_ext", "engine"})
# Which other kvhandoff packages each package may import. Every package may import itself.
ALLOWED: dict[str, frozenset[str]] = {
    "sessions": frozenset(),
    "collectives": frozenset(),
    "cuda_ext": frozenset(),
    "engine": frozenset({"sessions", "collectives", "cuda_ext"}),
    # Model caches into a pool's blocks: on top of the engine's pool; only the demo (its
    # real-model run, `kvhandoff demo --model`) imports it.
    "kvcache": frozenset({"engine", "cuda_ext"}),
    "analysis": frozenset(),
    "demo": RUNTIME | {"analysis", "kvcache"},
    "scenarios": RUNTIME | {"analysis"},
    "cli": RUNTIME | {"analysis", "demo", "scenarios"},
}
# Third-party packages a package may not import at all, not even inside a function.
BANNED: dict[str, frozenset[str]] = {
    "sessions": frozenset({"torch", "anyio", "numpy", "mpi4py"}),
    "analysis": frozenset({"torch", "anyio"}),
}
# Optional dependencies: imported inside functions only, in every package.
LAZY_ONLY = frozenset({"mpi4py", "nixl_cu13", "transformers"})
# Backend modules that import an optional dependency at their top, because the module *is*
# the backend: allowed only while every import of the module itself is inside a function
# (``test_layering_lazy_backends_are_imported_lazily``). File (from the repo root) -> module.
LAZY_BACKENDS: dict[str, str] = {"collectives/_mpi.py": "kvhandoff.collectives._mpi"}
_MODULE_STRING = re.compile(rf"{NAMESPACE}(\.[A-Za-z_][A-Za-z0-9_]*)+")


@dataclass(frozen=True)
class Import:
    """One import found in a file: ``module`` is absolute; ``names`` the names taken from it
    (``from module import names``), empty for a plain import."""

    file: str
    line: int
    module: str
    names: tuple[str, ...]
    in_function: bool
    type_checking_only: bool
    how: str

    @property
    def shown(self) -> str:
        if self.how == "from":
            return f"from {self.module} import {', '.join(self.names)}"
        if self.how == "import":
            return f"import {self.module}"
        return f"{self.how} {self.module!r}"


def _package_of(module: str) -> str | None:
    """The top-level kvhandoff package of an absolute module name, if it is ours."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == NAMESPACE else None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_import_call(call: ast.Call) -> bool:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module"
    return isinstance(func, ast.Name) and func.id in ("import_module", "__import__")


class _Scanner(ast.NodeVisitor):
    def __init__(self, file: str, module: str, is_package: bool) -> None:
        self.file = file
        self.module = module
        # What a relative import of level 1 is relative to.
        self.base = module if is_package else module.rpartition(".")[0]
        self.imports: list[Import] = []
        self.function_depth = 0
        self.type_checking_depth = 0
        self.computed_import = False
        self.literal_args: set[int] = set()  # ids of string constants already counted

    def _add(self, node: ast.stmt | ast.expr, module: str, names: tuple[str, ...],
             how: str) -> None:
        self.imports.append(Import(self.file, node.lineno, module, names,
                                   self.function_depth > 0, self.type_checking_depth > 0, how))

    def _resolve(self, name: str, level: int) -> str:
        if level == 0:
            return name
        base = self.base.split(".")
        if level - 1 >= len(base):
            raise ValueError(f"{self.file}: relative import beyond the top ({level} dots)")
        base = base[:len(base) - (level - 1)]
        return ".".join([*base, name] if name else base)

    def _function(self, node: ast.AST) -> None:
        self.function_depth += 1
        self.generic_visit(node)
        self.function_depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.type_checking_depth += 1
        for child in node.body:
            self.visit(child)
        self.type_checking_depth -= 1
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name, (), "import")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = self._resolve(node.module or "", node.level)
        names = tuple(alias.name for alias in node.names)
        if module == NAMESPACE:  # ``from kvhandoff import engine``: each name is a package
            for name in names:
                self._add(node, f"{NAMESPACE}.{name}", (), "from")
            return
        self._add(node, module, names, "from")

    def visit_Call(self, node: ast.Call) -> None:
        if _is_import_call(node) and node.args:
            target = node.args[0]
            if isinstance(target, ast.Constant) and isinstance(target.value, str):
                name, level = target.value, len(target.value) - len(target.value.lstrip("."))
                self._add(node, self._resolve(name[level:], level), (), "import_module")
                self.literal_args.add(id(target))
            else:
                self.computed_import = True
        self.generic_visit(node)


def _docstring_ids(tree: ast.Module) -> set[int]:
    """The string constants that are docstrings: they name modules without importing them."""
    owners = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, owners) and node.body and isinstance(node.body[0], ast.Expr)}


def scan_source(source: str, file: str, module: str, is_package: bool = False) -> list[Import]:
    """Every import of one source file (see the module docstring for what counts)."""
    tree = ast.parse(source, filename=file)
    scanner = _Scanner(file, module, is_package)
    scanner.visit(tree)
    if scanner.computed_import:
        # A lazy-import table: every other string naming one of our modules is a target.
        counted = scanner.literal_args | _docstring_ids(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and id(node) not in counted and _MODULE_STRING.fullmatch(node.value)
                    and _package_of(node.value) in ALLOWED):
                scanner.imports.append(Import(file, node.lineno, node.value, (), True, False,
                                              "import_module of the string"))
    return scanner.imports


@dataclass(frozen=True)
class Violation:
    """One import that breaks a rule; ``str()`` is the message the test shows."""

    imp: Import
    package: str
    rule: str  # "banned", "lazy", "arrow", "private", "unexported" or "unknown"
    why: str

    def __str__(self) -> str:
        return (f"{self.imp.file}:{self.imp.line}: kvhandoff.{self.package} {self.why}: "
                f"{self.imp.shown}")


Exports = Callable[[str], "frozenset[str] | None"]


def violations(package: str, imports: list[Import],
               exports: Exports | None = None) -> list[Violation]:
    """What breaks the arrows among ``imports`` made by modules of ``package``. ``exports``
    gives a module's ``__all__`` (None when it has none); by default read from the source."""
    exports = exports or static_all
    found = []
    for imp in imports:
        top = imp.module.split(".")[0]
        target = _package_of(imp.module)
        if top in BANNED.get(package, ()):
            found.append(Violation(imp, package, "banned", f"must not import {top} at all"))
        if top in LAZY_ONLY and not imp.in_function and not imp.type_checking_only \
                and imp.file not in LAZY_BACKENDS:
            found.append(Violation(imp, package, "lazy",
                                   f"imports the optional {top} at module level (import it "
                                   "inside the function that needs it)"))
        if target is None or target == package:
            continue
        if target not in ALLOWED:
            found.append(Violation(imp, package, "unknown",
                                   f"imports kvhandoff.{target}, which is not a package"))
            continue
        if target not in ALLOWED[package]:
            found.append(Violation(imp, package, "arrow", f"must not import kvhandoff.{target}"))
        private = [part for part in imp.module.split(".")[1:] if part.startswith("_")]
        private += [name for name in imp.names if name.startswith("_")]
        if private:
            found.append(Violation(imp, package, "private",
                                   f"imports the private {', '.join(private)} of another "
                                   f"package (use the public names of kvhandoff.{target})"))
            continue
        listed = exports(imp.module) if imp.names else None
        unlisted = [name for name in imp.names if listed is not None and name not in listed
                    and name != "*" and not _is_submodule(f"{imp.module}.{name}")]
        if unlisted:
            found.append(Violation(imp, package, "unexported",
                                   f"imports {', '.join(unlisted)}, not in the __all__ of "
                                   f"{imp.module}"))
    return found


def _module_file(module: str) -> Path | None:
    """The source file of one of our modules (a package's ``__init__.py``), if it exists."""
    parts = module.split(".")
    folder = packages().get(parts[1]) if _package_of(module) else None
    if folder is None:
        return None
    path = folder.joinpath(*parts[2:])
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _is_submodule(module: str) -> bool:
    return _module_file(module) is not None


@functools.cache
def static_all(module: str) -> frozenset[str] | None:
    """A module's ``__all__`` read from its source (a literal list or tuple), or None."""
    path = _module_file(module)
    if path is None:
        return None
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(target, ast.Name) and target.id == "__all__" for target in targets):
            return frozenset(ast.literal_eval(value))
    return None


@functools.cache
def packages() -> dict[str, Path]:
    """The top-level kvhandoff packages and their folders, from pyproject.toml."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_dir: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    return {name.split(".")[1]: REPO / folder for name, folder in package_dir.items()
            if name.count(".") == 1}


def source_files(package: str, folder: Path) -> Iterator[tuple[Path, str, bool]]:
    """(path, module name, is a package) for every Python file of ``package``."""
    for path in sorted(folder.rglob("*.py")):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        if "__pycache__" in parts:
            continue
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        yield path, ".".join([NAMESPACE, package, *parts]), is_package


def package_imports(package: str) -> list[Import]:
    folder = packages()[package]
    return [imp for path, module, is_package in source_files(package, folder)
            for imp in scan_source(path.read_text(), str(path.relative_to(REPO)), module,
                                   is_package)]


def test_layering_rules_cover_every_package() -> None:
    assert set(packages()) == set(ALLOWED), "give every package its arrows in ALLOWED"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_layering_package_imports_follow_the_arrows(package: str) -> None:
    imports = package_imports(package)
    assert imports, f"no import found in kvhandoff.{package}: is the scan looking there?"
    found = violations(package, imports)
    assert not found, f"{len(found)} import(s) break the layering:\n" + "\n".join(
        map(str, found))


def test_layering_lazy_backends_are_imported_lazily() -> None:
    modules = set(LAZY_BACKENDS.values())
    seen = [imp for package in ALLOWED for imp in package_imports(package)
            if imp.module in modules
            or any(f"{imp.module}.{name}" in modules for name in imp.names)]
    assert seen, "no import of a lazy backend found: is the scan looking there?"
    eager = [imp for imp in seen if not imp.in_function and not imp.type_checking_only]
    assert not eager, "a backend that imports an optional dependency at its top is " \
        "imported at module level:\n" + "\n".join(imp.shown() for imp in eager)


def test_layering_scan_sees_the_known_arrows() -> None:
    # The scan reads real imports: the engine's of sessions, the transports' lazy mpi4py,
    # collectives' relative ones.
    engine = package_imports("engine")
    assert any(imp.module == "kvhandoff.sessions" for imp in engine)
    assert any(imp.module == "mpi4py" and imp.in_function for imp in engine)
    collectives = package_imports("collectives")
    assert any(imp.module == "kvhandoff.collectives._backend" for imp in collectives)


SYNTHETIC = '''\
"""Docstrings naming kvhandoff.engine._engine are not imports."""
import mpi4py
import torch
from kvhandoff.engine import TransferEngine
from kvhandoff.collectives._logging import logging_enabled
from kvhandoff.collectives import _logging, CheckedComm
from ..cli import main
from .. import demo
from ._table import State
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpi4py import MPI

try:
    from mpi4py import MPI
except ImportError:
    MPI = None

LAZY = {"TransferHandle": "kvhandoff.engine._handle", "tag": "kvhandoff.sessions"}


def run(name):
    from mpi4py import MPI
    importlib.import_module("kvhandoff.analysis._reader")
    return importlib.import_module(LAZY[name])
'''


def test_layering_checker_flags_synthetic_violations() -> None:
    imports = scan_source(SYNTHETIC, "sessions/_bad.py", "kvhandoff.sessions._bad")
    found = violations("sessions", imports)
    assert sorted((v.imp.line, v.rule) for v in found) == [
        (2, "banned"), (2, "lazy"),  # import mpi4py
        (3, "banned"),  # import torch
        (4, "arrow"),  # kvhandoff.engine
        (5, "arrow"), (5, "private"),  # kvhandoff.collectives._logging
        (6, "arrow"), (6, "private"),  # from kvhandoff.collectives import _logging
        (7, "arrow"),  # from ..cli
        (8, "arrow"),  # from .. import demo
        (14, "banned"),  # banned even under TYPE_CHECKING, but not a module-level import
        (17, "banned"), (17, "lazy"),  # try: from mpi4py ... at module level
        (21, "arrow"), (21, "private"),  # the lazy table's "kvhandoff.engine._handle"
        (25, "banned"),  # lazy, still banned in sessions
        (26, "arrow"), (26, "private"),  # import_module("kvhandoff.analysis._reader")
    ]
    messages = {(v.imp.line, v.rule): str(v) for v in found}
    assert messages[(5, "private")] == (
        "sessions/_bad.py:5: kvhandoff.sessions imports the private _logging of another "
        "package (use the public names of kvhandoff.collectives): "
        "from kvhandoff.collectives._logging import logging_enabled")
    assert messages[(7, "arrow")] == (
        "sessions/_bad.py:7: kvhandoff.sessions must not import kvhandoff.cli: "
        "from kvhandoff.cli import main")
    assert messages[(21, "private")].endswith(
        "import_module of the string 'kvhandoff.engine._handle'")
    assert messages[(26, "arrow")].endswith("import_module 'kvhandoff.analysis._reader'")


def test_layering_checker_allows_the_arrows() -> None:
    source = (
        "from kvhandoff.sessions import State\n"
        "from kvhandoff.collectives import CheckedComm\n"
        "from . import _wire\n"
        "from .transports._base import Transport\n"
        "import anyio, torch\n"
        "def lazy():\n    from mpi4py import MPI\n"
    )
    imports = scan_source(source, "engine/_x.py", "kvhandoff.engine._x")
    assert [imp.module for imp in imports][:4] == [
        "kvhandoff.sessions", "kvhandoff.collectives", "kvhandoff.engine",
        "kvhandoff.engine.transports._base"]
    assert violations("engine", imports) == []
    cli = scan_source("from kvhandoff import demo, analysis, engine\n", "cli/__init__.py",
                      "kvhandoff.cli", is_package=True)
    assert violations("cli", cli) == []
    assert violations("analysis", cli) != []


def test_layering_checker_flags_names_left_out_of_all() -> None:
    source = (
        "from kvhandoff.collectives import CheckedComm, errors, helper\n"
        "from kvhandoff.sessions import anything\n"
    )
    imports = scan_source(source, "engine/_x.py", "kvhandoff.engine._x")
    fake_all = {"kvhandoff.collectives": frozenset({"CheckedComm"})}
    found = violations("engine", imports, exports=fake_all.get)
    # errors is a submodule of collectives, not a name of its __all__; sessions (here) has
    # no __all__, so any public name goes.
    assert [(v.imp.line, v.rule, v.why) for v in found] == [
        (1, "unexported", "imports helper, not in the __all__ of kvhandoff.collectives")]
    # The real __all__ is read from the source.
    assert "TRANSITIONS" in (static_all("kvhandoff.sessions") or ())
    assert static_all("kvhandoff.sessions.no_such_module") is None
