"""``kvhandoff demo``: the options, and the run from options to exit code.

``add_arguments`` and ``run`` are what ``kvhandoff.cli`` calls. The command line imports
this module to build its ``--help``: torch, anyio, rich and mpi4py are imported only once a
run starts.
"""

from __future__ import annotations

import argparse
import sys

from kvhandoff.demo import _backends, _report
from kvhandoff.demo._plan import WORLD, make_plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kvhandoff demo``."""
    parser.add_argument("--backend", choices=("embedded", "mpi", "nixl"), default="embedded",
                        help="embedded: 4 in-process ranks over loopback (default); mpi: one "
                             "rank per process, run under `mpiexec -n 4`; nixl: the same "
                             "processes, the KV over NIXL (needs kvhandoff[nixl])")
    parser.add_argument("--requests", type=int, default=8, metavar="N",
                        help="requests to move (default: 8)")
    parser.add_argument("--concurrency", type=int, default=4, metavar="N",
                        help="requests in flight at a time on each rank (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of requests, KV and faults")
    parser.add_argument("--blocks", type=int, default=192, metavar="N",
                        help="KV blocks per rank's pool (default: 192, i.e. 192 MiB with the "
                             "default shape); at least one request's worth")
    parser.add_argument("--layers", type=int, default=32, help="model layers (default: 32)")
    parser.add_argument("--kv-heads", type=int, default=8,
                        help="KV heads of the model, split over TP=2 (default: 8)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim (default: 128)")
    parser.add_argument("--block-tokens", type=int, default=16,
                        help="tokens per KV block (default: 16)")
    parser.add_argument("--min-tokens", type=int, default=128,
                        help="shortest prompt (default: 128)")
    parser.add_argument("--max-tokens", type=int, default=2048,
                        help="longest prompt (default: 2048)")
    parser.add_argument("--layerwise-every", type=int, default=4, metavar="K",
                        help="send every K-th request layer by layer; 0: never (default: 4)")
    parser.add_argument("--faults", action="store_true",
                        help="inject transport faults (seeded errors, stuck operations, "
                             "delays); failures are reported, leaks must still be 0")
    parser.add_argument("--log-dir", metavar="DIR",
                        help="write per-rank logs rank-<N>.jsonl here (for `kvhandoff analyze`)")
    parser.add_argument("--torch-threads", type=int, default=1, metavar="N",
                        help="torch intra-op threads per process (default: 1: the ranks' copies "
                             "are small and the ranks share the cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--model", action="store_true",
                        help="a real model instead of random bytes: a small random-initialised "
                             "Llama (extra `hf`: pip install 'kvhandoff[hf]') prefills on ranks "
                             "0-1, its KV moves layer by layer as each layer's forward ends, "
                             "ranks 2-3 decode; uses --requests, --seed, --block-tokens, "
                             "--min-tokens, --max-tokens, --decode-steps")
    parser.add_argument("--decode-steps", type=int, default=8, metavar="N",
                        help="with --model: greedy tokens decoded per request (default: 8)")


def run(args: argparse.Namespace) -> int:
    """Run the demo; the exit code: 0 clean, 1 failed books or requests, 2 bad options."""
    if args.model:
        from kvhandoff.demo import _model

        return _model.run(args)
    try:
        plan = make_plan(args)
    except ValueError as error:
        print(f"kvhandoff demo: {error}", file=sys.stderr)
        return 2
    progress = not args.no_progress and sys.stdout.isatty()
    import torch

    # Oversubscribed intra-op threads (4 ranks on few cores) make every small copy spin.
    torch.set_num_threads(args.torch_threads)
    if args.log_dir is not None:
        from kvhandoff.collectives import configure_logging

        configure_logging(args.log_dir)
    if args.backend in ("mpi", "nixl"):
        from mpi4py import MPI

        size = MPI.COMM_WORLD.Get_size()
        if size != WORLD:
            if MPI.COMM_WORLD.Get_rank() == 0:
                print(f"kvhandoff demo: --backend {args.backend} needs exactly {WORLD} "
                      f"processes, got {size}; run `mpiexec -n {WORLD} kvhandoff demo "
                      f"--backend {args.backend}`", file=sys.stderr)
            return 2
        if args.backend == "nixl" and args.faults:
            # The fault injector wraps two-sided transports; a one-sided one's faults are
            # real processes stopped or killed (tests/nixl_scripts/engine_nixl.py).
            if MPI.COMM_WORLD.Get_rank() == 0:
                print("kvhandoff demo: --faults is not available with --backend nixl",
                      file=sys.stderr)
            return 2
        result = _backends.run_mpi(plan, progress, nixl=args.backend == "nixl")
        if result is None:
            return 0
    else:
        result = _backends.run_embedded(plan, progress)
    summaries, seconds = result
    return _report.report(plan, summaries, seconds, sys.stdout)
