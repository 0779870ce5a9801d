"""kvhandoff.collectives: checked collectives that report a mismatch at the first mismatched
call, naming every rank's call site, and end a collective some rank never joins with a
timeout error listing every rank's position instead of a hang.

Backends (one module each, imported lazily): in-process (``local_group``,
``simulate_ranks``), mpi4py (``CheckedComm.from_mpi``), torch.distributed
(``CheckedComm.from_torch``). See docs/design.md.

Costs (what checking adds, per call):

- Object collectives piggyback: the fingerprint (seq, op, root, reduce op, site or tag) is
  pickled next to the payload in the same message, so checking issues no extra collective.
  Every checked operation is an allgather on the wire (that is what lets ranks that issued
  different operations meet and compare): gather and bcast therefore move every rank's
  contribution to every rank (bcast's non-roots send only the fingerprint). Keep gathered
  objects small; use buffer collectives for bulk data. Python bookkeeping (call site, flight
  recorder entry, fingerprint; on MPI the fingerprint is pickled once per distinct call and
  compared as one packed byte run per peer) is a few microseconds per call
  (benchmarks/bench_collectives.py measures it against raw mpi4py).
- MPI moves each call point-to-point (size - 1 messages per rank; fine for TP groups).
- Buffer collectives cannot carry a fingerprint on MPI and torch.distributed:
  ``buffer_check="preflight"`` (default) first exchanges the fingerprint with dtype and shape
  as one small object exchange (about doubling the latency of a small buffer call; nothing
  for large ones); ``"off"`` skips it (the call is still recorded and bounded by its
  deadline, but ranks that disagree are the backend's undefined behaviour). On MPI, numpy
  buffers of plain numbers up to 256 bytes ride inside their fingerprint's exchange in both
  modes: one exchange, checked. The in-process backend always piggybacks buffers.
- A wait reports the earliest failure on the communicator: polling any handle progresses
  the earlier pending ones first (a few attribute reads when there are none).
- Positions for a timeout report travel on a side channel only once half a deadline has
  passed; per-call logging (``configure_logging(..., per_call=True)``) is off by default.
"""

from __future__ import annotations

from ._comm import BUFFER_CHECK_MODES, DEFAULT_TIMEOUT_S, REDUCE_OPS, CheckedComm, CollectiveHandle
from ._local import local_group, simulate_ranks
from ._logging import configure_logging, logging_enabled, rank_logger
from ._outbox import SymmetricOutbox
from ._record import Fingerprint, FlightRecorder, Position, RecordEntry
from ._watchdog import dump_all
from .errors import (
    BackendUnavailableError,
    CollectiveAbortedError,
    CollectiveArgumentError,
    CollectiveBackendError,
    CollectiveDesyncError,
    CollectiveError,
    CollectiveTimeoutError,
    CommClosedError,
    PayloadError,
    SimulationError,
)

__all__ = [
    "BUFFER_CHECK_MODES",
    "DEFAULT_TIMEOUT_S",
    "REDUCE_OPS",
    "BackendUnavailableError",
    "CheckedComm",
    "CollectiveAbortedError",
    "CollectiveArgumentError",
    "CollectiveBackendError",
    "CollectiveDesyncError",
    "CollectiveError",
    "CollectiveHandle",
    "CollectiveTimeoutError",
    "CommClosedError",
    "Fingerprint",
    "FlightRecorder",
    "PayloadError",
    "Position",
    "RecordEntry",
    "SimulationError",
    "SymmetricOutbox",
    "configure_logging",
    "dump_all",
    "local_group",
    "logging_enabled",
    "rank_logger",
    "simulate_ranks",
]
