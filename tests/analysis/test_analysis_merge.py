"""``kvhandoff analyze`` and ``kvhandoff trace`` merge a call's enter/exit lines and
flight-recorder entries with one function (``_merge.merge_calls``), so they say the same about
every call. The log below is one where they used to disagree: ``analyze`` let an exit line's
identity win over an earlier dump entry and a dump's recorded start win over the start derived
from an exit line, ``trace`` (which merged in file order) did the opposite."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from kvhandoff.analysis import build_trace, load_logs
from kvhandoff.analysis._digest import digest_rank
from kvhandoff.analysis._merge import merge_calls
from kvhandoff.analysis._reader import read_rank_events

T0 = 1_763_700_000.0
SITE_A = "engine/_agreement.py:120 _round"
SITE_B = "engine/_datapath.py:80 _post"


def line(event: str, ts: float, **keys: Any) -> dict[str, Any]:
    return {"ts": T0 + ts, "rank": 0, "event": event, "level": "info", **keys}


def entry(seq: int, op: str, site: str, start: float, end: float | None,
          state: str) -> dict[str, Any]:
    return {"seq": seq, "op": op, "site": site, "tag": None, "summary": "int",
            "start": T0 + start, "end": None if end is None else T0 + end, "state": state}


LINES = [
    # seq 2: only its exit was logged, before the dump that holds it: the dump's recorded
    # start (2.0) beats the start derived from the exit (2.4 - 0.25).
    line("collective.exit", 2.4, comm="world", seq=2, op="bcast", site=SITE_A, tag=None,
         duration_s=0.25, state="completed"),
    line("flight_recorder.dump", 3.0, comm="world", reason="request", entries=[
        entry(2, "bcast", SITE_A, 2.0, 2.4, "completed"),
        entry(3, "allgather", SITE_B, 2.5, None, "pending"),
    ]),
    # seq 4: a dump names it first, its exit line later: the exit's identity wins.
    line("flight_recorder.dump", 3.5, comm="world", reason="signal", entries=[
        entry(4, "bcast", SITE_B, 3.1, 3.2, "completed"),
    ]),
    line("collective.exit", 3.6, comm="world", seq=4, op="allgather", site=SITE_A, tag=None,
         duration_s=0.1, state="failed"),
    # seq 3: the later dump knows more than the earlier one.
    line("flight_recorder.dump", 4.0, comm="world", reason="timeout", entries=[
        entry(3, "allgather", SITE_B, 2.5, 3.9, "timeout"),
    ]),
    # seq 5: entered and nothing after.
    line("collective.enter", 4.5, comm="world", seq=5, op="barrier", site=SITE_A, tag=None,
         root=None, reduce_op=None, summary="None"),
]
# seq -> (op, site, state, start, end); end None: still open.
EXPECTED = {
    2: ("bcast", SITE_A, "completed", 2.0, 2.4),
    3: ("allgather", SITE_B, "timeout", 2.5, 3.9),
    4: ("allgather", SITE_A, "failed", 3.1, 3.6),
    5: ("barrier", SITE_A, "pending", 4.5, None),
}


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    (tmp_path / "rank-0.jsonl").write_text("".join(json.dumps(x) + "\n" for x in LINES))
    return tmp_path


def test_merge_analyze_and_trace_agree_on_every_call(log_dir: Path) -> None:
    log = digest_rank(read_rank_events(log_dir / "rank-0.jsonl", 0)).calls["world"]
    analyzed = {}
    for seq in EXPECTED:
        position = log.position_of(0, seq)
        assert position is not None and position.ts is not None
        end = float(log.end[log.row_of(seq)])
        analyzed[seq] = (position.op, position.site, position.state, round(position.ts - T0, 6),
                         None if math.isnan(end) else round(end - T0, 6))
    assert analyzed == EXPECTED

    trace = build_trace(load_logs(log_dir))
    origin = trace["otherData"]["time_origin_s"]
    traced = {}
    last_line = LINES[-1]["ts"] - T0
    for event in trace["traceEvents"]:
        if event["ph"] == "X" and event["cat"] == "collective":
            start = round(event["ts"] / 1e6 + origin - T0, 6)
            end = round((event["ts"] + event["dur"]) / 1e6 + origin - T0, 6)
            args = event["args"]
            traced[args["seq"]] = (args["op"], args["site"], args["state"], start,
                                   None if args["state"] == "pending" else end)
            if args["state"] == "pending":  # drawn up to the rank's last line
                assert end == pytest.approx(max(last_line, start))
    assert traced == EXPECTED


def test_merge_is_the_same_for_both_typings(log_dir: Path) -> None:
    """The analyzer reads per-event structs, the trace LogLines: the merge gives the same."""
    def merged(lines: Any) -> dict[str, Any]:
        by_event: dict[str, list[Any]] = {}
        for decoded in lines:
            by_event.setdefault(decoded.event, []).append(decoded)
        logs = merge_calls(by_event.get("collective.enter", []),
                           by_event.get("collective.exit", []),
                           by_event.get("flight_recorder.dump", []))
        return {comm: (log.seqs.tolist(), [log.position(0, row) for row in range(len(log.seqs))],
                       log.end.tolist(), [log.summaries[i] for i in log.summary])
                for comm, log in logs.items()}

    events = read_rank_events(log_dir / "rank-0.jsonl", 0).lines
    plain = load_logs(log_dir).ranks[0].lines
    assert type(events[0]) is not type(plain[0])
    assert repr(merged(events)) == repr(merged(plain))  # repr: NaN (no end) != NaN
    (_, _, _, summaries), = merged(plain).values()
    assert summaries == ["int", "int", "int", "None"]  # the enter line's for seq 5
