"""``Transfer``: what the engine keeps for one request besides its session.

The session (``kvhandoff.sessions``, owned by the engine's ``SessionTable``) holds every fact
of the state machine: the state, the request id, role, peer and block ids, the failure, local
finality, cancel requests. A ``Transfer`` holds only what the state machine does not know:
the data operations posted for it, its staging buffer and tags, and how a failed transfer
winds its operations down (``WindDown``). Anything a session says is asked of the session.

Operations. A transfer has ``num_chunks`` chunks (one, or one per layer), chunk ``c`` on data
tag ``data_tag + c``; each chunk moves as ``pieces`` operations on its tag, in order, piece
``p`` carrying the blocks ``block_ids[piece_bounds[p]:piece_bounds[p + 1]]`` of the chunk's
tensors (packed, as ``cuda_ext.gather`` of them). ``ops[c * pieces + p]`` is that operation.
Of the last block only its valid token slots move (``_tokens``): the last piece of each
chunk has the ``tail`` and is ``short_nbytes`` shorter than its blocks; ``chunk_nbytes`` and
``total_nbytes`` are the bytes that move.

Staging. A staged side holds the whole transfer in ``staging`` when it has at most
``EngineConfig.staging_window`` operations; a larger one holds a *window* of ``window``
slots of ``slot_nbytes`` each (the widest piece), and each operation borrows a free slot
from its post until it is final (``slots``, ``free_slots``): staging memory is bounded by
the window, not the transfer. A windowed side posts in operation order (see ``_datapath``).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

import attrs
import torch
from kvhandoff.engine.transports import BlockTail, TransportHandle
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


#: The default of the containers a transfer needs only on some paths (set when it starts:
#: ``DataPath._plan``, or a layer-wise send's first ``layer_ready``): one shared empty
#: tuple, not a new list or set per transfer. Most transfers never need most of them, and
#: every container that lives as long as a transfer is one more object for the cyclic
#: collector to walk; a path that wrongly mutated the default fails loudly (a tuple).
_UNSET: Any = ()


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
    ops: list[TransportHandle | None] = _UNSET
    posted: int = 0
    expected: int = 0
    ops_pending: int = 0
    op_error: str | None = None
    layers_ready: set[int] = _UNSET
    wind_down: WindDown = WindDown.NONE
    #: Whether the peer already knows the outcome (it told us, or we told it).
    peer_told: bool = False
    #: Operations per chunk and where each one's blocks start (see the module docstring);
    #: set by the data path when the transfer starts.
    pieces: int = 1
    piece_bounds: tuple[int, ...] = ()
    #: What moves of each tensor's last block (None: all of it; see ``_tokens``), and the
    #: bytes per chunk that the rest of it would have added.
    tail: BlockTail | None = None
    short_nbytes: int = 0
    #: This side moves the blocks where they are (the transport's region form), not through
    #: ``staging``.
    regions: bool = False
    #: The staging window (see the module docstring): slots in all (0: the whole transfer
    #: is staged, each operation at its own offset), the bytes of one, the slot each posted
    #: and not yet final operation holds (by index), and the free ones.
    window: int = 0
    slot_nbytes: int = 0
    slots: dict[int, int] = attrs.field(factory=dict)
    free_slots: list[int] = _UNSET
    #: Each posted operation's index, by ``id(op)`` (a completion finds its piece in O(1)).
    op_index: dict[int, int] = attrs.field(factory=dict)
    #: A staged receiver's final operations not consumed yet (index -> landed), and how many
    #: pieces of each chunk were consumed: pieces are checksummed and scattered in order.
    arrived: dict[int, bool] = attrs.field(factory=dict)
    consumed: list[int] = _UNSET
    #: The first scatter that failed (reported when the transfer is final here).
    scatter_error: str | None = None
    #: A staged side's CRC-32 of each chunk so far, fed piece by piece in order.
    crcs: list[int] = _UNSET
    #: The receiver asked for the checksum of the moved bytes (``EngineConfig.checksum``);
    #: the sender's (from ACCEPT) and, on the receiver, what landed, once known.
    want_checksum: bool = False
    sent_checksum: int | None = None
    landed_checksum: int | None = None
    #: Tokens the transfer carries (validated at admission against the block count; the
    #: receiver's travels in ADVERTISE and must equal the sender's).
    num_tokens: int = 0
    #: The sender's per-transfer bytes for the receiver: on a sender what ``send()`` was
    #: given, on a receiver what ACCEPT brought.
    metadata: bytes = b""
    #: A receiver has the sender's ACCEPT (its metadata, and checksum when asked for): its
    #: outcome may be OK only once both this and every byte are in.
    accepted: bool = False

    #: Bytes the transfer moves (every chunk): only the last block's valid slots of it.
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

    @property
    def num_ops(self) -> int:
        """Operations the transfer moves in all."""
        return self.num_chunks * self.pieces

    def piece_ids(self, index: int) -> tuple[int, ...]:
        """The block ids operation ``index`` carries."""
        piece = index % self.pieces
        if self.pieces == 1:
            return self.block_ids
        return self.block_ids[self.piece_bounds[piece]:self.piece_bounds[piece + 1]]

    def piece_tail(self, index: int) -> BlockTail | None:
        """The tail of operation ``index``'s last block: the transfer's for the last piece
        of a chunk (it holds the last block), None for the others."""
        return self.tail if index % self.pieces == self.pieces - 1 else None

    @property
    def windowed(self) -> bool:
        """Staged through a window of fewer slots than operations."""
        return self.window > 0

    @property
    def block_chunk_nbytes(self) -> int:
        """The bytes one whole block adds to a chunk."""
        return (self.chunk_nbytes + self.short_nbytes) // len(self.block_ids)

    def piece_nbytes(self, index: int) -> int:
        """The bytes operation ``index`` carries."""
        piece = index % self.pieces
        blocks = self.piece_bounds[piece + 1] - self.piece_bounds[piece] \
            if self.pieces > 1 else len(self.block_ids)
        short = self.short_nbytes if piece == self.pieces - 1 else 0
        return blocks * self.block_chunk_nbytes - short

    def op_view(self, index: int) -> torch.Tensor:
        """The bytes of operation ``index`` in the staging buffer: its slot when windowed
        (it must hold one), else its offset in the whole transfer."""
        staging = self.staging
        assert staging is not None, "a staged operation needs the staging buffer"
        if self.window:
            start = self.slots[index] * self.slot_nbytes
            return staging[start:start + self.piece_nbytes(index)]
        if self.num_chunks == 1 and self.pieces == 1:
            return staging  # exactly the transfer's bytes: no slice to make per operation
        chunk, piece = divmod(index, self.pieces)
        # Every piece before the last is whole blocks.
        start = chunk * self.chunk_nbytes + self.piece_bounds[piece] * self.block_chunk_nbytes
        return staging[start:start + self.piece_nbytes(index)]
