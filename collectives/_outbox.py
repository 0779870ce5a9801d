"""SymmetricOutbox: the fix of seed 000 as a part.

Rank-local logic may want to tell its peers something only sometimes (a timeout happened, a
stats record is ready). Issuing a collective from inside that rank-local branch desyncs the
group. Instead, ``put()`` the item wherever the logic is, and call ``flush()`` at a point that
every rank reaches every iteration: it always issues exactly one allgather, even when this
rank's outbox is empty, so the group's collective sequence never depends on local state.
"""

from __future__ import annotations

from typing import Any

from ._comm import CheckedComm, CollectiveHandle


class SymmetricOutbox:
    """Items put anywhere, exchanged at a rank-symmetric flush point.

    ``flush()`` returns one list per rank (rank order) of the items that rank put since its
    last flush, and empties this rank's outbox. ``tag`` names the flush in the fingerprint
    (default: the flush's call site)."""

    def __init__(self, comm: CheckedComm, *, tag: str | None = None) -> None:
        self.comm = comm
        self.tag = tag
        self._items: list[Any] = []

    def put(self, item: Any) -> None:
        """Queue ``item`` for the next flush; never communicates."""
        self._items.append(item)

    def __len__(self) -> int:
        return len(self._items)

    def flush(self, *, timeout: float | None = None) -> list[list[Any]]:
        """Exactly one allgather (even when empty); every rank's items in rank order."""
        return self.iflush(timeout=timeout).result()  # type: ignore[no-any-return]

    def iflush(self, *, timeout: float | None = None) -> CollectiveHandle:
        """Non-blocking flush: the handle's result is what flush() returns."""
        items, self._items = self._items, []
        return self.comm.iallgather(items, tag=self.tag, timeout=timeout)
