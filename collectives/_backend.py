"""The small interface every backend implements.

A backend moves one *contribution* per rank per call and hands every rank the list of all
contributions (an allgather on the wire, whatever the checked operation is), so that ranks
that issued different operations still meet in the same wire collective and can compare
fingerprints instead of hanging or misreading each other's payloads. A contribution is
``(kind, header, payload)``: ``kind`` is NORMAL, ABORT (the rank's call failed locally; the
header says why) or CLOSED (the rank closed the communicator); ``header`` is a fingerprint
tuple; ``payload`` is bytes (a pickled object) or, for buffer collectives on backends that can
carry them, the buffer itself.
"""

from __future__ import annotations

from typing import Any, Protocol

from ._record import Position

NORMAL = 0
ABORT = 1
CLOSED = 2

Contribution = tuple[int, Any, Any]


class Exchange(Protocol):
    """One posted wire exchange. ``test()`` never blocks."""

    def test(self) -> bool: ...

    def agreed(self) -> list[Any] | None:
        """Once test() is True: every rank's payload (rank order) if every rank contributed
        NORMAL with exactly our header (a backend may compare packed bytes), else None, and
        contributions() is then what CheckedComm checks (asking again gives None again).
        Once it has returned the payloads, the exchange is spent."""

    def contributions(self) -> list[Contribution]: ...


class BufferExchange(Protocol):
    """One posted buffer collective (backends that cannot piggyback on buffers)."""

    def test(self) -> bool: ...

    def result(self) -> Any: ...


class Backend(Protocol):
    """What CheckedComm needs from a communicator."""

    rank: int
    size: int
    log_rank: int
    piggyback_buffers: bool
    # Raw-buffer backends: checked numpy buffers up to this many bytes may travel as the
    # payload of post() (one exchange) instead of a preflight plus a buffer exchange.
    inline_buffer_bytes: int

    def post(self, seq: int, kind: int, header: tuple[Any, ...], payload: Any,
             same_len: bool = False) -> Exchange:
        """Post this rank's contribution. ``same_len``: every rank whose fingerprint agrees
        sends a payload of the same length (a checked inline buffer); a backend may then
        compare the length as part of the fingerprint."""

    def post_buffer_allgather(self, buffer: Any) -> BufferExchange: ...

    def post_buffer_allreduce(self, buffer: Any, reduce_op: str) -> BufferExchange: ...

    def block(self, exchange: Any, max_s: float) -> None:
        """Wait at most ``max_s`` for progress on ``exchange`` (polling backends sleep)."""

    def announce(self, position: Position) -> None:
        """Tell peers where this rank is (on a side channel; called rarely)."""

    def positions(self) -> dict[int, Position | None]:
        """Last known position of every rank, without blocking."""

    def arrived(self, seq: int, positions: dict[int, Position | None]) -> set[int]:
        """Ranks known to have entered the wire exchange of ``seq``."""

    def close(self, seq: int) -> None: ...
