"""A Chrome / Perfetto trace of a run (``kvhandoff trace``), built from its rank logs.

The trace is the Trace Event Format's JSON object form (open it in https://ui.perfetto.dev or
chrome://tracing):

- one process per rank (``pid`` = rank, named ``rank N``);
- per rank, one thread per communicator (``collectives <comm>``) holding an ``X`` slice per
  collective call (enter/exit lines and flight-recorder entries merged by ``_merge``, as
  ``kvhandoff analyze`` merges them; a call with no end is drawn up to the rank's last known
  time, state ``pending``), and one thread per request (``session <id>``) holding an ``X``
  slice per session state, the terminal state as an instant; calls that overlap on one
  communicator (non-blocking forms) go to extra threads ``collectives <comm> (overlap N)`` so
  slices on a thread always nest;
- flow arrows (``s`` / ``t`` / ``f``, category ``collective.seq``) joining the slices of the
  same communicator and sequence number across ranks, in the order the ranks entered;
- thread ``events`` with an instant per line of every other event of the schema (desync,
  timeout, dump, health change, cancel, deferred free, the engine's warnings and failures).

Times are microseconds from the earliest line of the run (``otherData.time_origin_s`` holds
that origin in seconds since the epoch).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from kvhandoff.analysis import schema
from kvhandoff.analysis._merge import CallLog, merge_calls
from kvhandoff.analysis._reader import LogLine, LogSet

__all__ = ["build_trace", "write_trace"]

EVENTS_TID = 0
COLLECTIVE_CAT = "collective"
SESSION_CAT = "session"
FLOW_CAT = "collective.seq"
# Slices shorter than this are widened to it, so that a flow arrow has something to bind to.
MIN_SLICE_US = 1.0
# Every event but the ones drawn as slices is an instant: a new event shows up on its own.
_INSTANT_EVENTS = frozenset(schema.EVENTS) - {
    "collective.enter",
    "collective.exit",
    "session.transition",
}


def write_trace(logs: LogSet, path: str | os.PathLike[str]) -> int:
    """Write the trace of ``logs`` to ``path`` as JSON; return the number of trace events."""
    import msgspec

    trace = build_trace(logs)
    with open(path, "wb") as file:
        file.write(msgspec.json.encode(trace))
    return len(trace["traceEvents"])


def _calls_of(lines: list[LogLine]) -> dict[str, CallLog]:
    """comm -> the rank's calls on it, merged as ``kvhandoff analyze`` merges them."""
    by_event: dict[str, list[LogLine]] = {}
    for line in lines:
        by_event.setdefault(line.event, []).append(line)
    return merge_calls(
        by_event.get("collective.enter", []),
        by_event.get("collective.exit", []),
        by_event.get("flight_recorder.dump", []),
    )


def build_trace(logs: LogSet) -> dict[str, Any]:
    """The trace of ``logs`` as a JSON-ready dict (``traceEvents``, ``displayTimeUnit``,
    ``otherData``)."""
    import msgspec

    calls_by_rank = {rank: _calls_of(list(log.lines)) for rank, log in logs.ranks.items()}
    # The origin is the earliest time anywhere, recorder entries included (a dump can hold
    # calls that started before the rank's first line).
    starts = [log.lines[0].ts for log in logs.ranks.values() if log.lines]
    starts.extend(
        float(np.nanmin(log.start))
        for calls in calls_by_rank.values()
        for log in calls.values()
        if not np.isnan(log.start).all()
    )
    origin = min(starts) if starts else 0.0

    def us(ts: float) -> float:
        return (ts - origin) * 1e6

    events: list[dict[str, Any]] = []
    # (comm, seq) -> [(start_us, rank, tid)] for the flow arrows.
    flows: dict[tuple[str, int], list[tuple[float, int, int]]] = {}
    for rank in sorted(logs.ranks):
        lines = list(logs.ranks[rank].lines)
        last_ts = max((line.ts for line in lines), default=origin)
        events.append(_meta("process_name", rank, EVENTS_TID, {"name": f"rank {rank}"}))
        events.append(_meta("process_sort_index", rank, EVENTS_TID, {"sort_index": rank}))
        events.append(_meta("thread_name", rank, EVENTS_TID, {"name": "events"}))
        next_tid = EVENTS_TID + 1

        for comm, log in sorted(calls_by_rank[rank].items()):
            lane_ends: list[float] = []  # per lane, the end of its last slice
            lane_tids: list[int] = []
            for row in range(len(log.seqs)):
                seq = int(log.seqs[row])
                op, site, tag = log.calls[int(log.call[row])]
                start, end = float(log.start[row]), float(log.end[row])
                if np.isnan(start):
                    start = end
                if np.isnan(start):
                    continue  # a call with no time at all cannot be placed
                if np.isnan(end):
                    end = max(last_ts, start)
                begin_us = us(start)
                dur_us = max(us(end) - begin_us, MIN_SLICE_US)
                lane = next((i for i, free in enumerate(lane_ends) if free <= begin_us), None)
                if lane is None:
                    lane = len(lane_ends)
                    lane_ends.append(begin_us)
                    lane_tids.append(next_tid)
                    name = f"collectives {comm}" + (f" (overlap {lane})" if lane else "")
                    events.append(_meta("thread_name", rank, next_tid, {"name": name}))
                    events.append(
                        _meta("thread_sort_index", rank, next_tid, {"sort_index": next_tid})
                    )
                    next_tid += 1
                lane_ends[lane] = begin_us + dur_us
                tid = lane_tids[lane]
                events.append(
                    {
                        "name": f"{op} #{seq}",
                        "cat": COLLECTIVE_CAT,
                        "ph": "X",
                        "pid": rank,
                        "tid": tid,
                        "ts": begin_us,
                        "dur": dur_us,
                        "args": {
                            "comm": comm,
                            "seq": seq,
                            "op": op,
                            "site": site,
                            "tag": tag,
                            "state": log.states[int(log.state[row])],
                            "summary": log.summaries[int(log.summary[row])],
                        },
                    }
                )
                flows.setdefault((comm, seq), []).append((begin_us, rank, tid))

        transitions: dict[str, list[LogLine]] = {}
        for line in lines:
            if line.event == "session.transition" and line.request_id is not None:
                transitions.setdefault(line.request_id, []).append(line)
            elif line.event in _INSTANT_EVENTS:
                events.append(_instant(line, rank, us(line.ts), msgspec.to_builtins(line)))
        for request_id, history in transitions.items():
            tid = next_tid
            next_tid += 1
            events.append(_meta("thread_name", rank, tid, {"name": f"session {request_id}"}))
            events.append(_meta("thread_sort_index", rank, tid, {"sort_index": tid}))
            for line, following in zip(history, [*history[1:], None], strict=True):
                state = line.to_state or "?"
                args = {
                    "request_id": request_id,
                    "from_state": line.from_state,
                    "trigger": line.trigger,
                    "role": line.role,
                    "peer": line.peer,
                    "reason": line.reason,
                }
                if following is None and state in schema.TERMINAL_SESSION_STATES:
                    events.append(
                        {
                            "name": state,
                            "cat": SESSION_CAT,
                            "ph": "i",
                            "s": "t",
                            "pid": rank,
                            "tid": tid,
                            "ts": us(line.ts),
                            "args": args,
                        }
                    )
                    continue
                end = following.ts if following is not None else max(last_ts, line.ts)
                events.append(
                    {
                        "name": state,
                        "cat": SESSION_CAT,
                        "ph": "X",
                        "pid": rank,
                        "tid": tid,
                        "ts": us(line.ts),
                        "dur": max(us(end) - us(line.ts), MIN_SLICE_US),
                        "args": args,
                    }
                )

    flow_id = 0
    for (comm, seq), points in sorted(flows.items()):
        if len(points) < 2:
            continue
        flow_id += 1
        points.sort()
        for index, (ts_us, rank, tid) in enumerate(points):
            phase = "s" if index == 0 else "f" if index == len(points) - 1 else "t"
            flow: dict[str, Any] = {
                "name": f"{comm} #{seq}",
                "cat": FLOW_CAT,
                "ph": phase,
                "id": flow_id,
                "pid": rank,
                "tid": tid,
                "ts": ts_us,
            }
            if phase == "f":
                flow["bp"] = "e"  # bind to the enclosing slice, not the next one
            events.append(flow)

    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "tool": "kvhandoff trace",
            "log_dir": logs.log_dir,
            "time_origin_s": origin,
            "ranks": sorted(logs.ranks),
        },
    }


def _meta(name: str, pid: int, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": args}


def _instant(line: LogLine, rank: int, ts_us: float, fields: dict[str, Any]) -> dict[str, Any]:
    args = {
        key: value
        for key, value in fields.items()
        if value is not None and key not in ("ts", "rank", "event", "entries")
    }
    if line.entries is not None:
        args["entries"] = len(line.entries)
    return {
        "name": line.event,
        "cat": line.event.split(".", 1)[0],
        "ph": "i",
        "s": "t",
        "pid": rank,
        "tid": EVENTS_TID,
        "ts": ts_us,
        "args": args,
    }
