"""The ``kvhandoff`` command line (``kvhandoff`` or ``python -m kvhandoff.cli``).

The command line sits above the runtime: it imports the demo (``kvhandoff.demo``) and the
offline log tools (``kvhandoff.analysis``), and nothing of the runtime imports it. Each
subcommand lives in its own private module exposing ``add_arguments(parser)`` and
``run(args) -> int``. Modules keep heavy imports (torch, mpi4py) inside ``run`` so that
``kvhandoff --version`` and ``--help`` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

# (name, module, one-line help). Order is the order shown in --help.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("demo", "kvhandoff.demo.command", "run a simulated disaggregated serving job"),
    ("scenario", "kvhandoff.scenarios.command",
     "reproduce a seed failure unsafe, then see it prevented"),
    ("analyze", "kvhandoff.analysis.analyze_command",
     "say what went wrong in a run, from its rank logs"),
    ("trace", "kvhandoff.analysis.trace_command",
     "write a Chrome/Perfetto trace of a run's rank logs"),
)


def _version() -> str:
    try:
        return version("kvhandoff")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvhandoff",
        description="Move KV caches between prefill and decode ranks, and debug the runs.",
    )
    parser.add_argument("--version", action="version", version=f"kvhandoff {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in COMMANDS:
        module = importlib.import_module(module_name)
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return int(args._run(args))
