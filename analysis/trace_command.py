"""``kvhandoff trace LOG_DIR -o trace.json``: write a Chrome / Perfetto trace of a run (see
``_perfetto`` for what it holds). Exit status: 0 when written, 2 when the logs cannot be read.
Imports happen in ``run``, so that ``kvhandoff --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK = 0
EXIT_UNREADABLE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kvhandoff trace``."""
    parser.add_argument("log_dir", metavar="LOG_DIR", help="directory of rank-<N>.jsonl files")
    parser.add_argument(
        "-o", "--output", default="trace.json", help="trace file to write (default trace.json)"
    )


def run(args: argparse.Namespace) -> int:
    """Write the trace of ``args.log_dir`` to ``args.output``; 0 on success, 2 when the logs
    cannot be read."""
    from kvhandoff.analysis._perfetto import write_trace
    from kvhandoff.analysis._reader import load_logs
    from kvhandoff.analysis.errors import LogDirError

    try:
        logs = load_logs(args.log_dir)
    except LogDirError as exc:
        print(f"kvhandoff trace: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    count = write_trace(logs, args.output)
    for note in logs.notes:
        print(f"kvhandoff trace: note: rank {note.rank}: {note.detail}", file=sys.stderr)
    print(f"wrote {count} trace events for ranks {sorted(logs.ranks)} to {args.output}")
    return EXIT_OK
