"""Every logging call in the library's source logs an event of the schema, with exactly that
event's keys, at its level: checked statically, by an AST scan of every ``.py`` file under
the library's folders (a new module is scanned without being listed here).

A logging call is ``<receiver>.<level>("dotted.name", key=value, ...)`` where ``<level>`` is a
structlog method (``debug`` ... ``critical``, ``exception``) and either the event is a dotted
name or the receiver is a logger (its name holds ``log``: ``self._log``, ``logger`` ...). The
keys are the call's keywords, plus those of a ``**fields`` spread whose dict is built in the
same function (a literal, ``dict(...)``, ``fields[...] =``, ``fields.update(...)``), plus
what ``.bind(...)`` adds (common keys only). The keys of an object inside a line (a drain
entry ...) are checked where the call builds it as a dict literal. What cannot be resolved
statically must be listed in ``RUNTIME_CHECKED``: those keys are built by helpers (the
collectives' ``to_dict()``), and the tests that run the real code validate every line they
write with ``schema.check_line`` (test_analyze_scenarios.py, test_trace.py,
test_analyze_engine.py).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kvhandoff.analysis import schema

REPO = Path(__file__).resolve().parents[2]
LIBRARY_DIRS = ("sessions", "collectives", "cuda_ext", "engine", "analysis", "demo", "scenarios",
                "cli")
LEVEL_METHODS = frozenset({"debug", "info", "warning", "warn", "error", "exception",
                           "critical"})
# structlog writes these names at another level.
LEVEL_WRITTEN = {"warn": "warning", "exception": "error"}
# (event, key) whose object keys come from helpers; every line of them that the real code
# writes in the tests is validated with schema.check_line.
RUNTIME_CHECKED = frozenset({
    ("collective.desync", "ranks"),  # Fingerprint.to_dict()
    ("collective.timeout", "positions"),  # Position.to_dict()
    ("flight_recorder.dump", "entries"),  # RecordEntry.to_dict(), built before the call
})


@dataclass
class LogCall:
    """One logging call: where, at which level, the event, the keys found; ``unresolved``
    holds what the scan could not follow (a ``**`` spread, an event that is not a literal);
    ``objects`` maps a key to the key sets of the dict literals written as its objects, or
    None when they are not literals."""

    file: str
    line: int
    level: str
    event: str | None
    keys: list[str] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)
    objects: dict[str, list[frozenset[str]] | None] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def library_files() -> Iterator[Path]:
    for folder in LIBRARY_DIRS:
        yield from sorted((REPO / folder).rglob("*.py"))


def _receiver_name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Call):
        return _receiver_name(node.func)
    return ""


def _string(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _dict_keys(node: ast.expr) -> frozenset[str] | None:
    """The keys of a dict literal or ``dict(k=...)`` call, if all are known."""
    if isinstance(node, ast.Dict):
        keys = [_string(key) for key in node.keys]
        return frozenset(k for k in keys if k is not None) if None not in keys else None
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "dict" and not node.args
            and all(kw.arg is not None for kw in node.keywords)):
        return frozenset(kw.arg for kw in node.keywords if kw.arg is not None)
    return None


def _object_keys(node: ast.expr, kind: schema.KeyType) -> list[frozenset[str]] | None:
    """The key sets of the objects that ``node`` writes for a value of type ``kind``: [] when
    it holds none, None when they cannot be read off the source."""
    if isinstance(kind, schema.LogObject):
        keys = _dict_keys(node)
        return None if keys is None else [keys]
    if isinstance(kind, (schema.ListOf, schema.RankMap)):
        inner = kind.item if isinstance(kind, schema.ListOf) else kind.value
        if not isinstance(inner, (schema.LogObject, schema.ListOf, schema.RankMap)):
            return []
        if isinstance(kind, schema.ListOf) and isinstance(node, (ast.List, ast.Tuple)):
            items = node.elts
        elif isinstance(kind, schema.ListOf) and isinstance(node, ast.ListComp):
            items = [node.elt]
        elif isinstance(kind, schema.RankMap) and isinstance(node, ast.Dict):
            items = [value for value in node.values]
        elif isinstance(kind, schema.RankMap) and isinstance(node, ast.DictComp):
            items = [node.value]
        else:
            return None
        found: list[frozenset[str]] = []
        for item in items:
            keys = _object_keys(item, inner)
            if keys is None:
                return None
            found += keys
        return found
    return []


def _spread_keys(name: str, function: ast.AST | None) -> list[str] | None:
    """The keys of dict ``name`` as the enclosing function builds it, or None."""
    if function is None:
        return None
    keys: list[str] = []
    built = False
    for node in ast.walk(function):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id == name and node.value:
                    found = _dict_keys(node.value)
                    if found is None:
                        return None
                    keys += sorted(found)
                    built = True
                elif (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
                      and target.value.id == name):
                    key = _string(target.slice)
                    if key is None:
                        return None
                    keys.append(key)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "update" and isinstance(node.func.value, ast.Name)
              and node.func.value.id == name):
            if node.args or any(kw.arg is None for kw in node.keywords):
                return None
            keys += [kw.arg for kw in node.keywords if kw.arg is not None]
    return keys if built else None


class _Finder(ast.NodeVisitor):
    def __init__(self, file: str) -> None:
        self.file = file
        self.calls: list[LogCall] = []
        self.bound: list[tuple[str, int, str]] = []  # (file:line, key) of .bind() calls
        self.function: ast.AST | None = None

    def _in_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        outer, self.function = self.function, node
        self.generic_visit(node)
        self.function = outer

    visit_FunctionDef = visit_AsyncFunctionDef = _in_function

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "bind" \
                and "log" in _receiver_name(func.value).lower():
            self.bound += [(self.file, node.lineno, kw.arg or "**")
                           for kw in node.keywords]
        if isinstance(func, ast.Attribute) and func.attr in LEVEL_METHODS:
            event = _string(node.args[0]) if node.args else None
            is_event = event is not None and schema.EVENT_NAME.fullmatch(event) is not None
            if is_event or "log" in _receiver_name(func.value).lower():
                self.calls.append(self._log_call(node, func.attr, event))
        self.generic_visit(node)

    def _log_call(self, node: ast.Call, level: str, event: str | None) -> LogCall:
        call = LogCall(self.file, node.lineno, LEVEL_WRITTEN.get(level, level), event)
        if event is None:
            call.unresolved.append("the event name is not a string literal")
        if len(node.args) > 1:
            call.unresolved.append("positional arguments after the event name")
        spec = schema.EVENTS.get(event or "")
        types = {key.name: key.type for key in spec.keys} if spec is not None else {}
        for keyword in node.keywords:
            if keyword.arg is not None:
                call.keys.append(keyword.arg)
                if keyword.arg in types:
                    call.objects[keyword.arg] = _object_keys(keyword.value, types[keyword.arg])
                continue
            spread = keyword.value
            keys = _spread_keys(spread.id, self.function) if isinstance(spread, ast.Name) \
                else None
            if keys is None:
                call.unresolved.append(f"**{ast.unparse(spread)}")
            else:
                call.keys += keys
        return call


def scan() -> tuple[list[LogCall], list[tuple[str, int, str]]]:
    calls: list[LogCall] = []
    bound: list[tuple[str, int, str]] = []
    for path in library_files():
        finder = _Finder(str(path.relative_to(REPO)))
        finder.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        calls += finder.calls
        bound += finder.bound
    return calls, bound


def _objects_of(kind: schema.KeyType) -> schema.LogObject | None:
    while isinstance(kind, (schema.ListOf, schema.RankMap)):
        kind = kind.item if isinstance(kind, schema.ListOf) else kind.value
    return kind if isinstance(kind, schema.LogObject) else None


def check_calls(calls: list[LogCall], bound: list[tuple[str, int, str]]) -> list[str]:
    """Every way the calls differ from the schema, one line each."""
    common = {key.name for key in schema.COMMON_KEYS}
    written_by_logger = common - {"rank"}  # ts, event, level come from the processors
    bound_keys = {key for _, _, key in bound}
    problems = [f"{file}:{line}: .bind({key}=...) binds a key that is not on every line"
                for file, line, key in bound if key not in common]
    for call in calls:
        problems += [f"{call.where}: {why}: cannot be checked statically"
                     for why in call.unresolved]
        spec = schema.EVENTS.get(call.event or "")
        if spec is None:
            if call.event is not None:
                problems.append(f"{call.where}: event {call.event!r} is not in the schema")
            continue
        if call.level != spec.level:
            problems.append(f"{call.where}: {spec.name} logged at {call.level}, the schema "
                            f"says {spec.level}")
        expected = {key.name for key in spec.keys}
        given = set(call.keys)
        for key in sorted(given - expected):
            problems.append(f"{call.where}: {spec.name} key {key!r} is not in the schema")
        spread = any(why.startswith("**") for why in call.unresolved)
        for key in sorted(expected - given - bound_keys) if not spread else ():
            problems.append(f"{call.where}: {spec.name} lacks the schema's key {key!r}")
        for key in sorted(given & (written_by_logger | bound_keys)):
            problems.append(f"{call.where}: {spec.name} passes {key!r}, which the logger "
                            "writes itself")
        for key in spec.keys:
            shape = _objects_of(key.type)
            if shape is None or key.name not in call.objects:
                continue
            found = call.objects[key.name]
            if found is None:
                if (spec.name, key.name) not in RUNTIME_CHECKED:
                    problems.append(f"{call.where}: {spec.name} key {key.name!r}: its objects "
                                    "are not dict literals; check them at runtime and list "
                                    "the key in RUNTIME_CHECKED")
                continue
            want = {inner.name for inner in shape.keys}
            problems += [f"{call.where}: {spec.name} key {key.name!r}: object keys "
                         f"{sorted(keys)} differ from the {shape.name}'s {sorted(want)}"
                         for keys in found if keys != want]
    return problems


@pytest.fixture(scope="module")
def found() -> tuple[list[LogCall], list[tuple[str, int, str]]]:
    return scan()


def test_log_calls_match_the_schema(found: tuple[list[LogCall], list[Any]]) -> None:
    calls, bound = found
    assert check_calls(calls, bound) == []


def test_log_calls_cover_every_schema_event(found: tuple[list[LogCall], list[Any]]) -> None:
    calls, bound = found
    logged = {call.event for call in calls}
    assert sorted(set(schema.EVENTS) - logged) == [], "schema events no code logs"
    # The scan saw the calls it must see: the logger binds the rank, and the spread-out
    # keys that only run time can check are still there.
    assert ("rank" in {key for _, _, key in bound})
    unresolved = {(call.event, key) for call in calls for key, keys in call.objects.items()
                  if keys is None}
    assert unresolved == RUNTIME_CHECKED


def _check_source(source: str) -> list[str]:
    finder = _Finder("example.py")
    finder.visit(ast.parse(source))
    return [problem.split(": ", 1)[1] for problem in check_calls(finder.calls, finder.bound)]


def test_log_calls_scan_flags_what_the_schema_lacks() -> None:
    """The scan is not blind: each kind of mismatch in a made-up module is reported."""
    source = '''
def tick(self, rid, left, error):
    self._log.info("engine.tick", n=1)
    self._log.error("engine.tp_failed", error=error, comm="tp", tp_size=2)
    self._log.warning("control.send_failed", peer=1)
    self._log.info("engine.drain_left", left=[{"request_id": rid}])
    fields = {"error": error}
    fields["peer"] = 2
    self._log.warning("control.send_failed", **fields)
    extra = make_fields()
    self._log.warning("control.send_failed", **extra)
    self._log.warning(name_of_event, peer=1)
    log = structlog.get_logger().bind(rank=0, host="h")
'''
    assert _check_source(source) == [
        ".bind(host=...) binds a key that is not on every line",
        "event 'engine.tick' is not in the schema",
        "engine.tp_failed key 'tp_size' is not in the schema",
        "control.send_failed lacks the schema's key 'error'",
        "engine.drain_left logged at info, the schema says warning",
        "engine.drain_left key 'left': object keys ['request_id'] differ from the drain "
        "entry's ['request_id', 'state']",
        "**extra: cannot be checked statically",
        "the event name is not a string literal: cannot be checked statically",
    ]
