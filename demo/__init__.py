"""kvhandoff.demo: ``kvhandoff demo``, a simulated disaggregated serving run over the real
transfer engine.

Four ranks: ranks 0 and 1 are the prefill TP group, ranks 2 and 3 the decode TP group (TP=2
each), and prefill rank ``r`` sends its shard of every request's KV to decode rank ``r + 2``.
By default all four ranks are ``TransferEngine`` instances in this process, in one anyio event
loop, over the loopback transport and in-process TP groups; ``--backend mpi`` runs one rank per
process under ``mpiexec -n 4`` (MPITransport over COMM_WORLD, TP groups split from it).

Every rank walks the same request list (deterministic from ``--seed``), at most
``--concurrency`` requests at a time. Prefill writes each request's KV shard (bytes drawn
from a generator seeded by seed, request and TP rank), sends it and frees its blocks right
after ``send()`` (the pool defers the free until the transfer is quiescent); every
``--layerwise-every``-th request is sent layer by layer as prefill "produces" the layers.
Decode allocates, receives, regenerates the expected bytes and compares every block byte for
byte, then frees.

The pools run in debug mode: a freed block is poisoned, so a block that a transfer touched
after its free is caught (``PoisonError`` when it is allocated again, or ``assert_poisoned``
at the end). Exit code 0 only when no block leaked, none was written after its free, every
received block matched and, without ``--faults``, every request succeeded. With ``--faults``
each transport is wrapped in a seeded ``FaultyTransport`` (errors, stuck operations that end
by cancel, delays): failed requests are expected and reported by reason, the books must
still balance. (Under ``--backend mpi`` a layer-wise transfer failed half-way can leave the
sender's already-posted layer sends pending for good, as MPI cannot cancel a send; the demo
reports those blocks as leaked and exits 1.) Bad options exit with code 2.

The demo is a client of the runtime and uses only its public API (``kvhandoff.engine``,
``kvhandoff.engine.transports``, ``kvhandoff.collectives``, ``kvhandoff.cuda_ext``). Its parts:

- ``_plan``: the request list and the run's geometry (``Plan``, ``make_plan``), and the
  checks that turn a bad option into exit code 2;
- ``_host``: one rank's host loop around its engine (``RankHost``: prefill writes, sends and
  frees; decode allocates, receives and verifies; poison checks) and its books
  (``RankSummary``);
- ``_backends``: how the ranks are run (``run_embedded``: four in-process engines over
  loopback; ``run_mpi``: one rank per process under mpiexec), pool creation, the engine
  config, ``FaultyTransport`` wrapping and the progress bar;
- ``_report``: the report tables, one outcome per request, and the exit code;
- ``command``: ``add_arguments`` and ``run``, what ``kvhandoff.cli`` calls.
"""
