"""Every exception raised by kvhandoff.collectives.

They carry their data as attributes (ranks, positions, call sites) so that callers and the
log analyzer never parse messages; the messages say what to do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._record import Fingerprint, Position


class CollectiveError(Exception):
    """Base of every error raised by a checked communicator."""


class CollectiveDesyncError(CollectiveError):
    """Ranks issued different collectives at the same position of their sequence.

    ``table`` maps every rank whose fingerprint this rank saw to that fingerprint (seq, op,
    site, tag, root, reduce_op); ``expected`` is the majority fingerprint and
    ``mismatched_ranks`` the ranks that differ from it. The payloads of the mismatched call are
    never returned to the caller.
    """

    def __init__(self, comm: str, rank: int, seq: int, table: Mapping[int, Fingerprint],
                 expected: Fingerprint, mismatched_ranks: Sequence[int]) -> None:
        self.comm = comm
        self.rank = rank
        self.seq = seq
        self.table = dict(table)
        self.expected = expected
        self.mismatched_ranks = list(mismatched_ranks)
        lines = [
            f"collective desync on comm {comm!r} at seq {seq} (seen by rank {rank}): "
            f"ranks {self.mismatched_ranks} issued a different collective than their peers.",
            f"  expected : {expected.describe()}",
        ]
        for peer in sorted(self.table):
            mark = "observed" if peer in self.mismatched_ranks else "ok      "
            lines.append(f"  {mark} rank {peer}: {self.table[peer].describe()}")
        lines.append(
            "Every rank must issue the same collectives in the same order: move the call out of "
            "rank-local conditions (SymmetricOutbox.flush at a symmetric point, or gate it with "
            "comm.any(flag)); if two lines legitimately issue the same collective, give both the "
            "same tag=."
        )
        super().__init__("\n".join(lines))


class CollectiveTimeoutError(CollectiveError):
    """A collective did not complete before its deadline.

    ``arrived`` lists the ranks known to be in this collective, ``missing`` the others, and
    ``positions`` the last known position of every rank (``None`` where nothing is known).
    The communicator is unusable afterwards (its wire sequence is out of step).
    """

    def __init__(self, comm: str, rank: int, seq: int, op: str, site: str, deadline_s: float,
                 arrived: Sequence[int], missing: Sequence[int],
                 positions: Mapping[int, Position | None]) -> None:
        self.comm = comm
        self.rank = rank
        self.seq = seq
        self.op = op
        self.site = site
        self.deadline_s = deadline_s
        self.arrived = sorted(arrived)
        self.missing = sorted(missing)
        self.positions = dict(positions)
        lines = [
            f"collective {op} (seq {seq}) on comm {comm!r} at {site} did not complete within "
            f"{deadline_s:g}s on rank {rank}: arrived {self.arrived}, missing {self.missing}.",
        ]
        for peer in sorted(self.positions):
            pos = self.positions[peer]
            lines.append(f"  rank {peer}: {pos.describe() if pos is not None else 'unknown'}")
        lines.append(
            "The missing ranks are elsewhere (see their positions): make every rank reach this "
            "collective, e.g. OR-reduce a rank-local gate with comm.any(flag) first."
        )
        super().__init__("\n".join(lines))


class CollectiveAbortedError(CollectiveError):
    """A peer's call failed before it could contribute (bad payload, bad argument) or the peer
    closed the communicator; ``reasons`` maps each such rank to what happened there."""

    def __init__(self, comm: str, rank: int, seq: int, reasons: Mapping[int, str]) -> None:
        self.comm = comm
        self.rank = rank
        self.seq = seq
        self.reasons = dict(reasons)
        detail = "; ".join(f"rank {r}: {why}" for r, why in sorted(self.reasons.items()))
        super().__init__(
            f"collective seq {seq} on comm {comm!r} aborted (seen by rank {rank}): {detail}. "
            "Fix the error reported on those ranks."
        )


class CollectiveBackendError(CollectiveError):
    """The backend itself failed during a collective (e.g. torch.distributed reported that a
    peer's connection closed: the peer process probably crashed). ``cause`` is the backend's
    exception; check the peers' logs."""

    def __init__(self, comm: str, rank: int, seq: int, cause: BaseException) -> None:
        self.comm = comm
        self.rank = rank
        self.seq = seq
        self.cause = cause
        super().__init__(
            f"backend failure in collective seq {seq} on comm {comm!r} (rank {rank}): "
            f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}. "
            "A peer process probably died: check its log."
        )


class CollectiveArgumentError(CollectiveError, ValueError):
    """A call's arguments are invalid on this rank (root out of range, unknown reduce op,
    unsupported buffer type). Peers of the same call get CollectiveAbortedError."""


class PayloadError(CollectiveError, TypeError):
    """The payload could not be serialized (pickled) on this rank; ``cause`` is the original
    error. Peers of the same call get CollectiveAbortedError."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        self.cause = cause
        super().__init__(message)


class CommClosedError(CollectiveError):
    """The communicator was closed on this rank (or is unusable after a desync or timeout);
    ``reason`` says which. Create a new communicator to continue."""

    def __init__(self, comm: str, rank: int, reason: str) -> None:
        self.comm = comm
        self.rank = rank
        self.reason = reason
        super().__init__(
            f"communicator {comm!r} on rank {rank} is unusable: {reason}. Create a new one."
        )


class BackendUnavailableError(CollectiveError, ImportError):
    """The requested backend's library is not installed (message says which extra to install)."""


class SimulationError(CollectiveError):
    """simulate_ranks: at least one rank raised. ``errors`` maps rank -> exception and
    ``results`` rank -> return value for the ranks that returned."""

    def __init__(self, errors: Mapping[int, BaseException], results: Mapping[int, object],
                 stuck: Sequence[int] = ()) -> None:
        self.errors = dict(errors)
        self.results = dict(results)
        self.stuck = list(stuck)
        parts = [f"rank {r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                 for r, e in sorted(self.errors.items())]
        if self.stuck:
            parts.append(f"ranks {self.stuck} still running past the join timeout")
        super().__init__("simulated ranks failed: " + "; ".join(parts))
