"""``Transfer``: what the engine keeps for one request besides its session.

The session (``kvhandoff.sessions``, owned by the engine's ``SessionTable``) holds every fact
of the state machine: the state, the request id, role, peer and block ids, the failure, local
finality, cancel requests. A ``Transfer`` holds only what the state machine does not know:
the data operations posted for it, its staging buffer and tags, and how a failed transfer
winds its operations down (``WindDown``). Anything a session says is asked of the session.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import attrs
import torch
from kvhandoff.engine.transports import TransportHandle
from kvhandoff.sessions import Role, State, TransferSession

if TYPE_CHECKING:
    from kvhandoff.engine._handle import TransferHandle

__all__ = ["Transfer", "WindDown"]


class WindDown(enum.Enum):
    """How the data operations of a transfer settle (see ``DataPath.wind_down``)."""

    #: Running, or failed without its wind-down chosen yet.
    NONE = "none"
    #: Posted operations run to completion (a sender posts the chunks it has not posted yet,
    #: so every receive the peer posted is matched); the bytes are discarded.
    COMPLETE = "complete"
    #: Pending operations are cancelled, best effort, and nothing more is posted: the peer's
    #: side can no longer complete (deadline passed, peer lost or sent CANCEL, posting failed).
    ABORT = "abort"

    __hash__ = object.__hash__  # members are singletons: identity hashing agrees with ==


@attrs.define(eq=False, slots=True)
class Transfer:
    """One request's data path. ``ops`` are the posted data operations (one, or one per
    layer); ``expected`` is how many will be posted in all, lowered when posting stops early
    (failure, cancel), so the transfer is quiescent exactly when ``posted == expected`` and
    nothing is pending. ``handle`` is the host's view (None once released)."""

    session: TransferSession
    #: The session's request id: the key both this record and the session are stored under.
    request_id: str = attrs.field(init=False)
    layerwise: bool = attrs.field(kw_only=True)
    num_chunks: int = attrs.field(kw_only=True)
    chunk_nbytes: int = attrs.field(kw_only=True)
    handle: TransferHandle | None = None
    staging: torch.Tensor | None = None
    data_tag: int = 0
    ops: list[TransportHandle | None] = attrs.field(factory=list)
    posted: int = 0
    expected: int = 0
    ops_pending: int = 0
    op_error: str | None = None
    layers_ready: set[int] = attrs.field(factory=set)
    wind_down: WindDown = WindDown.NONE
    #: Whether the peer already knows the outcome (it told us, or we told it).
    peer_told: bool = False
    #: The receiver asked for the checksum of the moved bytes (``EngineConfig.checksum``);
    #: the sender's (from ACCEPT) and, on the receiver, what landed, once known.
    want_checksum: bool = False
    sent_checksum: int | None = None
    landed_checksum: int | None = None

    #: Bytes the transfer moves (every chunk).
    total_nbytes: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.request_id = self.session.request_id
        self.total_nbytes = self.chunk_nbytes * self.num_chunks

    # --- facts asked of the session --------------------------------------------------------

    @property
    def role(self) -> Role:
        return self.session.role

    @property
    def peer(self) -> int:
        return self.session.peer

    @property
    def block_ids(self) -> tuple[int, ...]:
        return self.session.block_ids

    @property
    def state(self) -> State:
        return self.session.state

    # --- the data path's own facts ----------------------------------------------------------

    @property
    def outcome_known(self) -> bool:
        """The host was told the outcome (its handle is settled)."""
        return self.handle is None or self.handle.done

    @property
    def quiescent_ops(self) -> bool:
        """No operation is pending and none will be posted any more."""
        return self.ops_pending == 0 and self.posted >= self.expected

    def chunk_view(self, chunk: int) -> torch.Tensor:
        """The bytes of one chunk in the staging buffer."""
        staging = self.staging
        assert staging is not None, "a chunk view needs the staging buffer taken at handshake"
        if self.num_chunks == 1:
            return staging  # exactly the transfer's bytes: no slice to make per operation
        size = self.chunk_nbytes
        return staging[chunk * size:(chunk + 1) * size]
