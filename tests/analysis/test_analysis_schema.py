"""``kvhandoff.analysis.schema`` is the one description of the logs: the committed
docs/log-schema.md is its render, the analyzer's structs are built from it, its value names
are the runtime's enums, ``check_line`` holds lines to it, and the package never imports the
runtime. (That every logging call of the library matches it: test_analysis_log_calls.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from kvhandoff import analysis
from kvhandoff.analysis import _reader, schema

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "log-schema.md"


def test_schema_doc_is_the_render() -> None:
    assert DOC.read_text(encoding="utf-8") == schema.render_markdown(), (
        "docs/log-schema.md is out of date: run "
        "`python -m kvhandoff.analysis.schema -o docs/log-schema.md`"
    )


def test_schema_main_writes_the_render(tmp_path: Path) -> None:
    output = tmp_path / "schema.md"
    result = subprocess.run(
        [sys.executable, "-m", "kvhandoff.analysis.schema", "-o", str(output)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert output.read_text(encoding="utf-8") == schema.render_markdown()


def _all_keys() -> list[tuple[str, schema.LogKey]]:
    """(where, key) for every key of every event and object."""
    found = [("line", key) for key in schema.COMMON_KEYS]
    for event in schema.EVENTS.values():
        found += [(event.name, key) for key in event.keys]
    for shape in schema.OBJECTS:
        found += [(shape.name, key) for key in shape.keys]
    return found


def test_schema_key_names_have_one_type_and_events_are_dotted() -> None:
    # One type per key name is what lets one LogLine struct hold every line.
    types: dict[str, set[str]] = {}
    for _, key in _all_keys():
        types.setdefault(key.name, set()).add(schema._type_text(key.type))
    assert {name: kinds for name, kinds in types.items() if len(kinds) > 1} == {}
    common = {key.name for key in schema.COMMON_KEYS}
    for name, event in schema.EVENTS.items():
        assert name == event.name and schema.EVENT_NAME.fullmatch(name), name
        names = [key.name for key in event.keys]
        assert len(names) == len(set(names)) and not common & set(names), name


def _struct_fields(struct: Any) -> dict[str, Any]:
    return {field.name: field.type for field in msgspec.structs.fields(struct)}


def test_schema_decoders_are_built_from_it() -> None:
    common = [key.name for key in schema.COMMON_KEYS]
    for name, event in schema.EVENTS.items():
        struct = _reader.EVENT_STRUCTS[name]
        assert list(_struct_fields(struct)) == [
            *(key for key in common if key != "event"), *(key.name for key in event.keys)
        ], name
        assert struct.event == name
        assert struct.__struct_config__.tag == name
    every_key = dict.fromkeys(key.name for where, key in _all_keys()
                              if where == "line" or where in schema.EVENTS)
    assert list(_struct_fields(_reader.LogLine)) == list(every_key)
    entry = _struct_fields(_reader.RecorderEntry)
    assert list(entry) == [key.name for key in schema.RECORDER_ENTRY.keys]
    assert entry["seq"] is int and entry["start"] == float | None  # required / optional


def test_schema_decodes_every_event_both_ways() -> None:
    """A line of each event with every key decodes the same into its struct and LogLine."""
    samples = {
        int: 3, float: 1.5, str: "x", bool: True,
    }

    def sample(kind: schema.KeyType, key: schema.LogKey) -> Any:
        if isinstance(kind, schema.ListOf):
            return [sample(kind.item, key)]
        if isinstance(kind, schema.RankMap):
            return {"0": sample(kind.value, key)}
        if isinstance(kind, schema.LogObject):
            return {inner.name: sample(inner.type, inner) for inner in kind.keys}
        return key.values[0] if key.values else samples[kind]

    for name, event in schema.EVENTS.items():
        line = {"ts": 1.0, "rank": 0, "event": name, "level": event.level}
        line.update({key.name: sample(key.type, key) for key in event.keys})
        assert schema.check_line(line) == [], name
        raw = msgspec.json.encode(line) + b"\n"
        (typed,) = msgspec.json.Decoder(Any).decode_lines(raw)
        (per_event,) = _reader._EVENT_DECODER.decode_lines(raw)
        (plain,) = _reader._LINE_DECODER.decode_lines(raw)
        assert type(per_event) is _reader.EVENT_STRUCTS[name] and per_event.event == name
        for key in event.keys:
            assert msgspec.to_builtins(getattr(per_event, key.name)) == typed[key.name]
            assert msgspec.to_builtins(getattr(plain, key.name)) == typed[key.name]


def test_schema_value_names_are_the_runtime_enums() -> None:
    from kvhandoff.sessions import (
        NO_PROGRESS,
        QUARANTINE_BUDGET_EXCEEDED,
        TERMINAL_STATES,
        CancelResult,
        Event,
        FailureReason,
        Role,
        State,
    )

    assert schema.SESSION_STATES == tuple(state.name for state in State)
    assert schema.TERMINAL_SESSION_STATES == {state.name for state in TERMINAL_STATES}
    assert schema.SESSION_TRIGGERS == tuple(event.name for event in Event)
    assert schema.ROLES == tuple(role.value for role in Role)
    assert schema.FAILURE_REASONS == tuple(reason.value for reason in FailureReason)
    assert schema.CANCEL_RESULTS == tuple(result.name for result in CancelResult)
    assert {QUARANTINE_BUDGET_EXCEEDED, NO_PROGRESS} <= set(schema.HEALTH_REASONS)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"event": "session.started"}, "event 'session.started' is not in the schema"),
        ({"trigger": "DONE"}, "session.transition.trigger: 'DONE' is not one of"),
        ({"peer": True}, "session.transition.peer: True is not int"),
        ({"reason": None}, ""),
        ({"outcome_unknown": True}, ""),
        ({"outcome_unknown": None}, ""),
        ({"outcome_unknown": 1}, "session.transition.outcome_unknown: 1 is not bool"),
        ({"outcome_unknown": "yes"}, "session.transition.outcome_unknown: 'yes' is not bool"),
        ({"request_id": None}, "session.transition.request_id: null"),
        ({"attempt": 2}, "session.transition: key 'attempt' is not in the schema"),
        ({"level": "fatal"}, "session.transition.level: 'fatal' is not one of"),
        ({"ts": None}, "session.transition.ts: null"),
    ],
)
def test_schema_check_line_names_what_is_wrong(change: dict[str, Any], problem: str) -> None:
    line: dict[str, Any] = {
        "ts": 1.0, "rank": 0, "event": "session.transition", "level": "info",
        "request_id": "r", "role": "sender", "peer": 1, "from_state": "QUEUED",
        "to_state": "ADVERTISED", "trigger": "ADVERTISE", "reason": "peer_lost",
        "outcome_unknown": False,
    }
    line.update(change)
    problems = schema.check_line(line)
    if problem:
        assert len(problems) == 1 and problems[0].startswith(problem), problems
    else:
        assert problems == []


def test_schema_check_line_looks_inside_objects() -> None:
    entry = {"seq": 0, "op": "barrier", "site": "x.py:1 f", "tag": None, "summary": "None",
             "start": 1.0, "end": None, "state": "pending"}
    line = {"ts": 2.0, "rank": 0, "event": "flight_recorder.dump", "level": "warning",
            "comm": "tp", "reason": "watchdog", "entries": [entry]}
    assert schema.check_line(line) == []
    entry["state"] = "stuck"
    del entry["summary"]  # a missing key
    assert schema.check_line(line) == [
        "flight_recorder.dump.entries[0]: key 'summary' is missing",
        "flight_recorder.dump.entries[0].state: 'stuck' is not one of pending, completed, "
        "failed, desync, timeout",
    ]
    positions = {"ts": 2.0, "rank": 0, "event": "collective.timeout", "level": "error",
                 "comm": "tp", "seq": 1, "op": "barrier", "site": "s", "tag": None,
                 "deadline_s": 1, "arrived": [0], "missing": [1],
                 "positions": {"one": {"seq": 1, "op": "barrier", "site": "s", "tag": None,
                                       "state": "pending"}}}
    assert schema.check_line(positions) == ["collective.timeout.positions: key 'one' is not "
                                            "a rank"]


def test_analysis_exports_match_all() -> None:
    assert sorted(analysis.__all__) == sorted(set(analysis.__all__))
    for name in analysis.__all__:
        assert getattr(analysis, name) is not None, name
    assert set(schema.__all__) <= set(dir(schema))
    with pytest.raises(AttributeError):
        _ = analysis.no_such_name


def test_analysis_never_imports_the_runtime(tmp_path: Path) -> None:
    """Reading, analyzing, rendering and tracing a log imports no runtime package, nor
    torch or anyio; importing the package and its command modules (what ``kvhandoff --help``
    does) imports none of numpy, msgspec, rich, attrs."""
    (tmp_path / "rank-0.jsonl").write_text(
        '{"ts": 1.0, "rank": 0, "event": "engine.tp_failed", "level": "error", '
        '"error": "CollectiveTimeoutError: seq 3 timed out"}\n'
    )
    code = (
        "import sys, io\n"
        "import kvhandoff.analysis as analysis\n"
        "from kvhandoff.analysis import analyze_command, trace_command\n"
        "light = sorted(m for m in ('numpy', 'msgspec', 'rich', 'attrs') if m in sys.modules)\n"
        "report = analysis.analyze_logs(sys.argv[1], workers=1)\n"
        "from rich.console import Console\n"
        "analysis.render(report, Console(file=io.StringIO()))\n"
        "analysis.write_trace(analysis.load_logs(sys.argv[1]), sys.argv[1] + '/trace.json')\n"
        "banned = ('kvhandoff.engine', 'kvhandoff.collectives', 'kvhandoff.sessions',\n"
        "          'kvhandoff.cuda_ext', 'torch', 'anyio')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in banned\n"
        "                or '.'.join(m.split('.')[:2]) in banned)\n"
        "print(light, loaded, report.problems)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[] [] ("), result.stdout
    assert "TP group broken on rank(s) 0: CollectiveTimeoutError" in result.stdout
