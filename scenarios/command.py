"""``kvhandoff scenario NNN [--unsafe | --fixed]``: one seed failure, shown or prevented.

Without flags the safe run shows the checked collectives catching the bug (typed error on
every rank, naming the call sites) and then the fixed pattern completing; ``--unsafe`` runs
the same loop unchecked and shows the field's symptom; ``--fixed`` only the fixed pattern.
Exit 0 when the run showed what it should, 1 otherwise, 2 on bad options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from kvhandoff.scenarios._runner import SCENARIOS, Verdict, run_collective


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NNN", help="the seed: " + ", ".join(
        f"{name} ({text})" for name, (text, _) in SCENARIOS.items()))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--unsafe", action="store_true",
                      help="run the loop without kvhandoff's checks: show the symptom")
    mode.add_argument("--fixed", action="store_true", help="run only the fixed pattern")
    parser.add_argument("--seed", type=int, default=0,
                        help="which ranks diverge, and when (002: which link wedges which "
                             "requests)")
    parser.add_argument("--backend", choices=("embedded", "mpi"), default=None,
                        help="in-process ranks, or this process's rank of mpiexec -n 4 "
                             "(default: mpi when started by mpiexec)")
    parser.add_argument("--log-dir", default=None, help="write per-rank logs here")
    parser.add_argument("--stacks", action="store_true",
                        help="print the stack of every hung rank")


def _default_backend() -> str:
    import os

    launched = any(key in os.environ for key in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE",
                                                 "PMIX_RANK", "HYDRA_CONTROL_FD"))
    return "mpi" if launched else "embedded"


def run(args: argparse.Namespace) -> int:
    if args.name not in SCENARIOS:
        print(f"unknown scenario {args.name!r}; one of {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    backend = args.backend or _default_backend()
    text, module_name = SCENARIOS[args.name]
    module: Any = importlib.import_module(module_name)
    rank = 0
    if backend == "mpi":
        try:
            from mpi4py import MPI
        except ImportError:
            print("--backend mpi needs mpi4py: install with `pip install kvhandoff[mpi]`",
                  file=sys.stderr)
            return 2
        world = MPI.COMM_WORLD
        rank = world.Get_rank()
        if world.Get_size() != 4:
            if rank == 0:
                print("run under `mpiexec -n 4`", file=sys.stderr)
            return 2
    if args.log_dir is not None:
        from kvhandoff.collectives import configure_logging

        configure_logging(args.log_dir, per_call=args.unsafe)
    safe_modes = list(getattr(module, "SAFE_MODES", ("checked", "fixed")))
    modes = ["unsafe"] if args.unsafe else ["fixed"] if args.fixed else safe_modes
    if rank == 0:
        print(f"scenario {args.name}: {text} [{'/'.join(modes)}, {backend}, seed {args.seed}]",
              flush=True)
    ok = True
    for mode in modes:
        verdict: Verdict | None
        if hasattr(module, "run_mode"):
            verdict = module.run_mode(mode, args.seed, backend, args.stacks)
        else:
            verdict = run_collective(module.SCENARIO, mode, args.seed, backend, args.stacks)
            if mode == "fixed" and backend == "embedded" and hasattr(module, "engine_layerwise"):
                extra = module.engine_layerwise(args.seed)
                assert verdict is not None
                verdict = Verdict(verdict.ok and extra.ok, verdict.lines + extra.lines)
        if verdict is not None:
            label = "symptom shown" if mode == "unsafe" else "protected"
            status = "OK" if verdict.ok else "NOT AS EXPECTED"
            print(f"[{mode}] {status} ({label})" if mode != "fixed"
                  else f"[{mode}] {status} (completed)", flush=True)
            for line in verdict.lines:
                print("  " + line, flush=True)
            ok = ok and verdict.ok
    if backend == "mpi":
        from mpi4py import MPI

        ok = bool(MPI.COMM_WORLD.bcast(ok, root=0))
    if args.log_dir is not None:
        from kvhandoff.collectives import configure_logging

        configure_logging(None)
    return 0 if ok else 1
