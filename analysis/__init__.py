"""kvhandoff.analysis: the offline log tools (``kvhandoff analyze`` and ``kvhandoff trace``).

They read the per-rank JSON logs that the runtime writes and never import the runtime. The
logs' format is ``kvhandoff.analysis.schema``, the one description of every event and key.

- ``analyze_logs(log_dir)`` / ``analyze(load_logs(log_dir))``: a ``Report`` of what went
  wrong (desyncs, hangs, sessions, health, a broken TP group, the engine's warnings, a
  host's stalled loop and late writes, with what injected faults explain apart);
  ``render(report)`` prints it as tables.
- ``build_trace(logs)`` / ``write_trace(logs, path)``: a Chrome / Perfetto trace.

Exports resolve lazily (PEP 562): importing the package costs nothing until a name is used,
so that ``kvhandoff --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvhandoff.analysis import schema
    from kvhandoff.analysis._diagnosis import (
        NO_LOG_NOTE,
        PARALLEL_MIN_BYTES,
        analyze,
        analyze_logs,
    )
    from kvhandoff.analysis._perfetto import build_trace, write_trace
    from kvhandoff.analysis._reader import (
        InputNote,
        LogLine,
        LogSet,
        RankLog,
        load_logs,
        read_rank_log,
    )
    from kvhandoff.analysis._render import render
    from kvhandoff.analysis._report import (
        CallPosition,
        Cancel,
        Divergence,
        EarlyFree,
        EventExample,
        EventTally,
        Hang,
        HealthChange,
        InjectedFault,
        LateWrite,
        PinnedBlocks,
        Quarantine,
        Report,
        SessionOutcome,
        Stall,
        TimelineEntry,
        TpFailure,
        Whereabouts,
    )
    from kvhandoff.analysis.errors import LogDirError
    from kvhandoff.analysis.schema import (
        COMMON_KEYS,
        EVENTS,
        LogEvent,
        LogKey,
        LogObject,
        check_line,
        render_markdown,
    )

# Public name -> the module that defines it.
_LAZY: dict[str, str] = {
    **dict.fromkeys(
        ["NO_LOG_NOTE", "PARALLEL_MIN_BYTES", "analyze", "analyze_logs"],
        "kvhandoff.analysis._diagnosis",
    ),
    **dict.fromkeys(["build_trace", "write_trace"], "kvhandoff.analysis._perfetto"),
    **dict.fromkeys(
        ["InputNote", "LogLine", "LogSet", "RankLog", "load_logs", "read_rank_log"],
        "kvhandoff.analysis._reader",
    ),
    "render": "kvhandoff.analysis._render",
    "LogDirError": "kvhandoff.analysis.errors",
    **dict.fromkeys(
        ["CallPosition", "Cancel", "Divergence", "EarlyFree", "EventExample", "EventTally",
         "Hang", "HealthChange", "InjectedFault", "LateWrite", "PinnedBlocks", "Quarantine",
         "Report", "SessionOutcome", "Stall", "TimelineEntry", "TpFailure", "Whereabouts"],
        "kvhandoff.analysis._report",
    ),
    **dict.fromkeys(
        ["COMMON_KEYS", "EVENTS", "LogEvent", "LogKey", "LogObject", "check_line",
         "render_markdown"],
        "kvhandoff.analysis.schema",
    ),
}

__all__ = [
    "COMMON_KEYS",
    "EVENTS",
    "NO_LOG_NOTE",
    "PARALLEL_MIN_BYTES",
    "CallPosition",
    "Cancel",
    "Divergence",
    "EarlyFree",
    "EventExample",
    "EventTally",
    "Hang",
    "HealthChange",
    "InjectedFault",
    "InputNote",
    "LateWrite",
    "LogDirError",
    "LogEvent",
    "LogKey",
    "LogLine",
    "LogObject",
    "LogSet",
    "PinnedBlocks",
    "Quarantine",
    "RankLog",
    "Report",
    "SessionOutcome",
    "Stall",
    "TimelineEntry",
    "TpFailure",
    "Whereabouts",
    "analyze",
    "analyze_logs",
    "build_trace",
    "check_line",
    "load_logs",
    "read_rank_log",
    "render",
    "render_markdown",
    "schema",
    "write_trace",
]


def __getattr__(name: str) -> Any:
    if name == "schema":
        value: Any = importlib.import_module("kvhandoff.analysis.schema")
    else:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
