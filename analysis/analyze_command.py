"""``kvhandoff analyze LOG_DIR``: say what went wrong in a run, from its per-rank logs.

Prints the report of ``analyze_logs`` as tables (rich, ``_render``), or as JSON with
``--json``. Exit status: 0 when the run was clean, 1 when a problem was found, 2 when the input
cannot be read at all (no such directory, no rank file). Imports happen in ``run``, so that
``kvhandoff --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

EXIT_CLEAN = 0
EXIT_PROBLEMS = 1
EXIT_UNREADABLE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kvhandoff analyze``."""
    parser.add_argument("log_dir", metavar="LOG_DIR", help="directory of rank-<N>.jsonl files")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--request", metavar="ID", default=None, help="add the cross-rank timeline of a request"
    )
    parser.add_argument(
        "--comm", metavar="NAME", default=None, help="only this communicator's collectives"
    )


def run(args: argparse.Namespace) -> int:
    """Analyze ``args.log_dir``; print the report; return 0, 1 or 2 (see module doc)."""
    import msgspec
    from kvhandoff.analysis._diagnosis import analyze_logs
    from kvhandoff.analysis._render import render
    from kvhandoff.analysis.errors import LogDirError

    try:
        report = analyze_logs(args.log_dir, request_id=args.request, comm=args.comm)
    except LogDirError as exc:
        print(f"kvhandoff analyze: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(report), indent=2).decode())
        sys.stdout.write("\n")
    else:
        render(report)
    return EXIT_CLEAN if report.clean else EXIT_PROBLEMS
