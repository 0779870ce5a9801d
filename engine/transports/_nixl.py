"""NIXL transport: one-sided WRITEs of descriptor lists between agents, polled without blocking.

Theory of operation. NIXL (UCX underneath) moves bytes one-sidedly: once a rank has made its
memory addressable, a peer's WRITE lands in it with no operation of the rank's own. The
two-sided contract of ``Transport`` (post a send, post a receive, both become final) is kept
by a small protocol of NIXL notifications around each WRITE:

1. The receiver's ``post_recv_regions`` registers the regions' tensors (once, see below) and
   sends the peer an ADVERTISE notification: ``(tag, advertisement id, nbytes)`` and the
   regions' ``(address, length)`` pairs. From this moment the peer may write into those
   regions at any time, so the handle stays pending until the peer says it is done with
   them: the WRITE's own completion notification (DONE: the handle becomes ``DONE``), or a
   REFUSE (the sender will never write there: size mismatch, its WRITE failed, or the
   advertisement was retracted; the handle becomes ``FAILED``).
2. The sender's ``post_send_regions`` waits (pending, nothing posted) until the peer's
   advertisement for ``(peer, tag)`` has arrived (first posted matches first advertised, as
   tags match elsewhere), cuts both region lists at the union of their boundaries so local
   and remote descriptor ``i`` have one length, prepares both descriptor lists and posts one
   WRITE carrying the DONE notification. The handle becomes ``DONE`` when
   ``check_xfer_state`` says so, ``FAILED`` when NIXL reports an error (the receiver is told
   with a REFUSE when it can still be reached).

The sender WRITEs (rather than the receiver READing) because the sender is the side that
knows when its data is ready and NIXL delivers the completion notification to the target
after the data: the receiver learns "the bytes are in place" from one message it did not
have to ask for, and the sender's memory is read only between post and its own completion.

What cancellation can promise. A WRITE that NIXL has accepted cannot be proven stopped:
releasing an active NIXL request asks the backend to abort, which is not proof that no byte
still moves. So a posted WRITE is never cancelled and never made final on a release: the
send handle stays pending until ``check_xfer_state`` is final (``cancellable_kinds`` is
``{SEND}``, and ``cancel()`` succeeds only for a send still waiting for its advertisement). A
receiver cannot cancel on its own either (the peer may be writing); ``retract()`` asks the
peer to drop the advertisement, and the handle becomes ``FAILED`` "cancelled" once the peer
confirms it never wrote (or ``DONE`` if the write had already happened).

A lost peer. A dead target surfaces as ``nixlRemoteDisconnectError`` on the initiator's
next post or status check: the send fails. A dead initiator gives the target nothing, so
while any operation with a peer is open the transport probes it with a tiny PING
notification every ``probe_interval_s``; a probe that raises marks the peer lost. Sends
waiting for that peer fail at once (nothing was written). A receive's regions may have been
written until the initiator died and, on a NIC, a write in flight can still land shortly
after: the handle stays pending, its regions in use, for ``fence_grace_s`` more and only then
fails with ``peer lost`` (the fencing grace). A lost peer stays lost.

Memory registration. Whole tensors are registered once, the first time a region in them or
a buffer is posted (or up front with ``register``), and stay registered, and referenced, until
``close()`` has seen every operation final: never per transfer, never on a release. A new
registration is announced to every peer as NIXL partial metadata in a REGISTERED
notification, which the peer loads before the ADVERTISE that follows it (notifications
from one agent arrive in order). Pass long-lived tensors (the pool's layers, a staging
buffer): each one posted is pinned in memory until close.

Control messages travel as CONTROL notifications. The notifications' format, and the cutting
of two region lists into a WRITE's descriptor pairs, are in ``_nixl_wire.py`` (raw
little-endian bytes behind a ``b"KVNX"`` header, never pickle). A notification that does not
decode is dropped and counted in ``dropped_messages``.

Progress. The agent runs without NIXL's progress thread (the bundled one spins a core when
idle); ``poll()`` drives everything: it drains notifications (which progresses UCX), checks
posted WRITEs, sends probes. Over UCX's cma transport ``transfer()`` performs the whole copy
inside the call, so ``post_send_regions`` (when the advertisement is already there) or the
``poll()`` that matches an advertisement blocks for the copy (``bench_transport_nixl.py``
prints how long: tens of milliseconds per 64 MiB in 32 KiB pieces on the 2-core machine; the
call releases the GIL, so a caller may run the engine's tick in a worker thread).

Bootstrap: each rank creates its agent and the ranks exchange agent metadata once. The
constructor takes an ``exchange`` function (this rank's metadata in, every rank's out),
called twice: the metadata, then, once every peer's metadata is loaded, a ``connected``
token, so no rank goes on (and perhaps exits) while another still connects to it;
``over_mpi(comm)`` allgathers it over MPI (raw bytes), ``rendezvous(folder, ...)`` through
files in a folder on the local file system (for processes on one host without MPI: no port
is picked in advance, so none can be taken by another job first).

Under the engine (``TransferEngine(pool, NixlTransport...)``): the transport declares
``one_sided``, so the engine retracts receives instead of cancelling them and posts nothing
more after a failure (docs/design.md, One-sided transports); it registers the pool's layers
at start (``register``), moves each chunk as one WRITE on the region path
(``region_min_bytes`` 0), and asks ``peer_lost`` with its leases on every tick, so a peer
the probes find gone fails its transfers at once instead of after ``lease_s``. The host
closes the transport after the engine drained, then calls ``release_memory()``.
``probe_interval_s`` and ``fence_grace_s`` belong here, not in ``EngineConfig``: they describe
the fabric; keep the probe interval well under the engine's lease.

NIXL is imported when a transport is created (``pip install kvhandoff[nixl]``).
"""

from __future__ import annotations

import itertools
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kvhandoff.engine.transports._base import (
    HandleKind,
    HandleState,
    Transport,
    TransportHandle,
)
from kvhandoff.engine.transports._nixl_wire import (
    KIND_ADVERTISE,
    KIND_CONTROL,
    KIND_DONE,
    KIND_PING,
    KIND_REFUSE,
    KIND_REGISTERED,
    KIND_RETRACT,
    REFUSE_FAILED,
    REFUSE_REASONS,
    REFUSE_RETRACTED,
    REFUSE_SIZE,
    decode_notification,
    encode_notification,
)
from kvhandoff.engine.transports._regions import Regions, common_cut
from kvhandoff.engine.transports.errors import (
    InvalidBufferError,
    ProtocolError,
    TransportBootstrapError,
    TransportUnavailableError,
)

__all__ = ["NixlTransport"]

INSTALL_HINT = "install with `pip install kvhandoff[nixl]` (nixl-cu13, next to your torch pin)"

# -- handles ----------------------------------------------------------------------------------


class _NixlHandle(TransportHandle):
    def __init__(self, owner: NixlTransport, kind: HandleKind, peer: int, tag: int,
                 regions: Regions) -> None:
        super().__init__(kind, peer, tag, regions.nbytes, owner._ready.append)
        self._owner = owner
        self._buffer = regions  # the transport may touch this memory until final
        self.regions = regions
        #: Send: "waiting" (for the advertisement), "posted" (WRITE accepted by NIXL).
        #: Receive: "advertised", "retracting", "fencing" (peer lost, grace running).
        self.phase = "waiting" if kind is HandleKind.SEND else "advertised"
        self.adv_id = -1
        self.xfer: Any = None
        self.dlists: tuple[Any, ...] = ()
        self.fence_until = 0.0

    def _progress(self) -> None:
        self._owner._advance()

    def cancel(self) -> bool:
        return self._owner._cancel(self)

    def retract(self) -> bool:
        """A receive only: ask the peer to drop this advertisement. ``True`` if the request
        was sent (the handle becomes ``FAILED`` "cancelled" once the peer confirms it never
        wrote, or ``DONE`` if it had); ``False`` if the handle is final, already retracting,
        or a send."""
        return self._owner._retract(self)


class _Peer:
    """What this rank knows of one peer agent."""

    def __init__(self, rank: int, name: str) -> None:
        self.rank = rank
        self.name = name
        self.lost_reason: str | None = None
        self.next_probe = 0.0
        # Advertisements received and not yet matched by a send, per tag, in arrival order:
        # (adv_id, nbytes, device, addresses, lengths).
        self.adverts: dict[int, deque[tuple[int, int, int, np.ndarray, np.ndarray]]] = {}
        self.waiting_sends: dict[int, deque[_NixlHandle]] = {}
        self.recvs: dict[int, _NixlHandle] = {}  # by adv_id


# -- the transport ----------------------------------------------------------------------------


#: The token of the bootstrap's second, barrier round.
CONNECTED = b"kvhandoff-nixl-connected"


class NixlTransport(Transport):
    """Point-to-point over NIXL agents, one per rank, connected by ``exchange``.

    ``exchange(metadata) -> every rank's metadata`` shares this rank's agent metadata with
    the others (``over_mpi`` and ``rendezvous`` build it), and is then called once more with
    ``CONNECTED`` as a barrier; ``tensors`` are registered before
    the exchange, so peers know them from the start. ``probe_interval_s``: how often a peer
    with open operations is probed; ``fence_grace_s``: how long a receive waits after its
    peer was lost before it fails (see the module docstring). ``progress_thread``: NIXL's own
    (off by default: ``poll()`` drives progress).
    """

    moves_regions = True
    one_sided = True
    region_min_bytes = 0  # a staging buffer would only add a copy before the same WRITE
    cancellable_kinds = frozenset({HandleKind.SEND})

    def __init__(self, rank: int, world_size: int, exchange: Callable[[bytes], Sequence[bytes]],
                 *, tensors: Iterable[torch.Tensor] = (), probe_interval_s: float = 0.1,
                 fence_grace_s: float = 1.0, progress_thread: bool = False,
                 name: str | None = None) -> None:
        super().__init__()
        if type(world_size) is not int or world_size < 2:
            raise ValueError(f"a NIXL group needs at least 2 ranks, got {world_size!r}")
        if type(rank) is not int or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank!r} is not in 0..{world_size - 1}")
        if probe_interval_s <= 0 or fence_grace_s < 0:
            raise ValueError("probe_interval_s must be > 0 and fence_grace_s >= 0, got "
                             f"{probe_interval_s!r} and {fence_grace_s!r}")
        nixl = _import_nixl()
        self.rank = rank
        self.world_size = world_size
        self.probe_interval_s = float(probe_interval_s)
        self.fence_grace_s = float(fence_grace_s)
        self.dropped_messages = 0
        self.name = name or f"kvhandoff-{rank}-{os.getpid()}-{secrets.token_hex(4)}"
        config = nixl.nixl_agent_config(enable_prog_thread=progress_thread, backends=["UCX"])
        self._agent = nixl.nixl_agent(self.name, config)
        if "UCX" not in self._agent.backends:
            raise TransportUnavailableError("nixl", "NIXL's UCX plugin is missing: " + INSTALL_HINT)
        # (start, end, tensor, NIXL registration list), kept until close.
        self._registered: list[tuple[int, int, torch.Tensor, Any]] = []
        self._adv_ids = itertools.count(1)
        self._inbox: deque[tuple[int, bytes]] = deque()
        self._posted: list[_NixlHandle] = []
        self._fencing: list[_NixlHandle] = []
        for tensor in tensors:
            self._register_tensor(_checked_tensor(tensor), announce=False)
        everyone = list(exchange(self._agent.get_agent_metadata()))
        if len(everyone) != world_size or not all(isinstance(m, bytes) for m in everyone):
            raise TransportBootstrapError(
                f"the metadata exchange returned {len(everyone)} entries for {world_size} "
                "ranks (expected one bytes object per rank)")
        self._peers: dict[int, _Peer] = {}
        self._by_name: dict[str, _Peer] = {}
        for peer_rank, metadata in enumerate(everyone):
            if peer_rank == rank:
                continue
            try:
                peer_name = self._agent.add_remote_agent(metadata)
            except Exception as exc:
                raise TransportBootstrapError(
                    f"rank {peer_rank}'s NIXL metadata was not accepted: {exc}") from None
            text = peer_name.decode() if isinstance(peer_name, bytes) else str(peer_name)
            if text in self._by_name or text == self.name:
                raise TransportBootstrapError(f"two ranks share the agent name {text!r}")
            self._peers[peer_rank] = self._by_name[text] = _Peer(peer_rank, text)
        # A barrier: a rank that finished early must not close its agent while a slower one
        # still connects to it (UCX then refuses the connection and the slow rank fails).
        acks = list(exchange(CONNECTED))
        if len(acks) != world_size or any(ack != CONNECTED for ack in acks):
            raise TransportBootstrapError(
                "the connected barrier of the bootstrap returned something else than one "
                f"{CONNECTED!r} per rank")

    # -- bootstrap helpers ---------------------------------------------------------------

    @classmethod
    def over_mpi(cls, comm: Any = None, **kwargs: Any) -> NixlTransport:
        """A transport for every rank of ``comm`` (default ``COMM_WORLD``); collective. The
        metadata is allgathered as raw bytes (``Allgather`` of sizes, ``Allgatherv``)."""
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise TransportUnavailableError(
                "mpi", f"install with `pip install kvhandoff[mpi]` ({exc})") from None
        comm = MPI.COMM_WORLD if comm is None else comm

        def exchange(metadata: bytes) -> list[bytes]:
            sizes = np.zeros(comm.Get_size(), dtype=np.int64)
            comm.Allgather([np.array([len(metadata)], dtype=np.int64), MPI.INT64_T],
                           [sizes, MPI.INT64_T])
            offsets = np.concatenate(([0], np.cumsum(sizes)[:-1]))
            out = bytearray(int(sizes.sum()))
            comm.Allgatherv([metadata, MPI.BYTE],
                            [out, (sizes.tolist(), offsets.tolist()), MPI.BYTE])
            return [bytes(out[o:o + s]) for o, s in zip(offsets.tolist(), sizes.tolist(),
                                                          strict=True)]

        return cls(comm.Get_rank(), comm.Get_size(), exchange, **kwargs)

    @classmethod
    def rendezvous(cls, folder: str | os.PathLike[str], rank: int, world_size: int, *,
                   timeout_s: float = 60.0, **kwargs: Any) -> NixlTransport:
        """A transport whose ranks (processes on one host) meet through files in
        ``folder``: each writes ``rank<N>.nixl-md`` (atomically, by rename) and reads the
        others'. ``TransportBootstrapError`` if a rank's file does not appear in
        ``timeout_s``. The folder should be fresh for each group."""
        root = Path(folder)
        rounds = itertools.count()

        def exchange(metadata: bytes) -> list[bytes]:
            suffix = f"nixl-md{next(rounds) or ''}"  # one file per round: metadata, barrier
            temporary = root / f".rank{rank}.{suffix}.{os.getpid()}"
            temporary.write_bytes(metadata)
            os.replace(temporary, root / f"rank{rank}.{suffix}")
            deadline = time.monotonic() + timeout_s
            out: list[bytes] = []
            for other in range(world_size):
                path = root / f"rank{other}.{suffix}"
                pause = 1e-3
                while not path.exists():
                    if time.monotonic() > deadline:
                        raise TransportBootstrapError(
                            f"rank {other} did not join the rendezvous in {root} within "
                            f"{timeout_s}s")
                    time.sleep(pause)  # waiting for another process to start: no event
                    pause = min(pause * 2, 0.05)
                out.append(path.read_bytes())
            return out

        return cls(rank, world_size, exchange, **kwargs)

    # -- registration ----------------------------------------------------------------------

    def register(self, tensors: Iterable[torch.Tensor]) -> None:
        """Register the storage of each tensor now (else on its first post) and announce it
        to every peer. Registered storage stays registered and referenced until close."""
        self._check_open("register")
        for tensor in [_checked_tensor(t) for t in tensors]:
            self._register_tensor(tensor, announce=True)

    @property
    def registered_bytes(self) -> int:
        return sum(end - start for start, end, _, _ in self._registered)

    def _covered(self, start: int, end: int) -> bool:
        return any(s <= start and end <= e for s, e, _, _ in self._registered)

    def _register_tensor(self, tensor: torch.Tensor, announce: bool) -> None:
        """Register the whole storage under ``tensor`` (a layer, or the base of a strided
        view such as K or V of an interleaved pool) unless it is registered already."""
        storage = tensor.untyped_storage()
        start = storage.data_ptr()
        end = start + storage.nbytes()
        if self._covered(start, end):
            return
        mem_type, _ = _memory_type(tensor.device)
        reg = self._agent.register_memory(
            np.array([[start, end - start, _device_id(tensor.device)]], dtype=np.uint64),
            mem_type)
        self._registered.append((start, end, tensor, reg))
        if announce:
            partial = self._agent.get_partial_agent_metadata(reg, inc_conn_info=False)
            for peer in self._peers.values():
                self._notify(peer, encode_notification(KIND_REGISTERED, body=partial))

    def _register_regions(self, regions: Regions) -> None:
        starts = regions.addresses
        ends = starts + regions.lengths
        inside = np.zeros(len(regions), dtype=bool)
        for owner in regions.owners:
            low = owner.untyped_storage().data_ptr()
            high = low + owner.untyped_storage().nbytes()
            inside |= (starts >= low) & (ends <= high)
        if not inside.all():
            raise InvalidBufferError("a region lies outside the tensors it names as owners",
                                     device=str(regions.device))
        for owner in regions.owners:
            self._register_tensor(owner, announce=True)

    # -- posting ---------------------------------------------------------------------------

    def post_send(self, buf: torch.Tensor, peer: int, tag: int) -> TransportHandle:
        peer, tag, data = self._check_post(HandleKind.SEND, buf, peer, tag)
        return self._post_send(_whole(data), peer, tag)

    def post_recv(self, buf: torch.Tensor, peer: int, tag: int) -> TransportHandle:
        peer, tag, data = self._check_post(HandleKind.RECV, buf, peer, tag)
        return self._post_recv(_whole(data), peer, tag)

    def post_send_regions(self, regions: Regions, peer: int, tag: int) -> TransportHandle:
        """Pending until the peer's advertisement for ``tag`` arrives, then one WRITE; when
        the advertisement is already there the WRITE is posted here and, over cma, copies
        inside this call."""
        self._check_open("post_send")
        return self._post_send(self._check_regions(regions), self._check_peer(peer),
                               self._check_tag(tag))

    def post_recv_regions(self, regions: Regions, peer: int, tag: int) -> TransportHandle:
        """Advertise the regions to ``peer`` for ``tag``: from now on the peer may write them,
        until the handle is final."""
        self._check_open("post_recv")
        return self._post_recv(self._check_regions(regions), self._check_peer(peer),
                               self._check_tag(tag))

    def _check_regions(self, regions: object) -> Regions:
        if not isinstance(regions, Regions) or len(regions) == 0 or regions.nbytes <= 0:
            raise InvalidBufferError("expected a non-empty Regions (see block_regions)")
        _memory_type(regions.device)
        return regions

    def _post_send(self, regions: Regions, peer: int, tag: int) -> TransportHandle:
        self._register_regions(regions)
        handle = _NixlHandle(self, HandleKind.SEND, peer, tag, regions)
        state = self._peers[peer]
        if state.lost_reason is not None:
            handle._finish(HandleState.FAILED, state.lost_reason)
            return handle
        adverts = state.adverts.get(tag)
        if adverts:
            advert = adverts.popleft()
            if not adverts:
                del state.adverts[tag]
            self._write(handle, state, advert)
        else:
            state.waiting_sends.setdefault(tag, deque()).append(handle)
        return handle

    def _post_recv(self, regions: Regions, peer: int, tag: int) -> TransportHandle:
        self._register_regions(regions)
        handle = _NixlHandle(self, HandleKind.RECV, peer, tag, regions)
        state = self._peers[peer]
        if state.lost_reason is not None:
            handle._finish(HandleState.FAILED, state.lost_reason)
            return handle
        handle.adv_id = next(self._adv_ids)
        state.recvs[handle.adv_id] = handle
        body = (np.ascontiguousarray(regions.addresses, dtype="<u8").tobytes()
                + np.ascontiguousarray(regions.lengths, dtype="<u8").tobytes())
        self._notify(state, encode_notification(
            KIND_ADVERTISE, tag, handle.adv_id, regions.nbytes, len(regions),
            _device_id(regions.device), body=body))
        return handle

    def _write(self, handle: _NixlHandle, peer: _Peer,
               advert: tuple[int, int, int, np.ndarray, np.ndarray]) -> None:
        """Start the WRITE of ``handle`` into the advertisement ``advert`` of ``peer``."""
        adv_id, nbytes, device, addresses, lengths = advert
        handle.adv_id = adv_id
        if nbytes != handle.nbytes:
            self._refuse(peer, handle.tag, adv_id, REFUSE_SIZE)
            handle._finish(HandleState.FAILED, f"size mismatch: sender has {handle.nbytes} "
                                                f"bytes, receiver advertised {nbytes}")
            return
        regions = handle.regions
        local, remote, piece = common_cut(regions.addresses, regions.lengths,
                                          addresses, lengths)
        mem_type, _ = _memory_type(regions.device)
        agent = self._agent
        count = len(piece)
        indices = np.arange(count, dtype=np.int32)
        try:
            local_list = agent.prep_xfer_dlist(
                "NIXL_INIT_AGENT",
                np.stack([local, piece, np.full(count, _device_id(regions.device),
                                                 dtype=np.uint64)], axis=1), mem_type)
            handle.dlists = (local_list,)
            remote_list = agent.prep_xfer_dlist(
                peer.name, np.stack([remote, piece, np.full(count, device, dtype=np.uint64)],
                                    axis=1), mem_type)
            handle.dlists = (local_list, remote_list)
            handle.xfer = agent.make_prepped_xfer(
                "WRITE", local_list, indices, remote_list, indices,
                notif_msg=encode_notification(KIND_DONE, handle.tag, adv_id))
        except Exception as exc:  # nothing was posted: the peer's memory was not touched
            self._release_nixl(handle)
            if _is_disconnect(exc):
                self._peer_lost(peer, f"peer {peer.rank} lost: {exc}")
            else:
                self._refuse(peer, handle.tag, adv_id, REFUSE_FAILED)
            handle._finish(HandleState.FAILED, f"NIXL could not prepare the WRITE: {exc}")
            return
        handle.phase = "posted"
        try:
            status = agent.transfer(handle.xfer)
        except Exception as exc:
            self._write_failed(handle, peer, exc)
            return
        if status == "DONE":
            self._write_done(handle)
        elif status == "ERR":
            self._write_failed(handle, peer, RuntimeError("transfer() returned ERR"))
        else:
            self._posted.append(handle)

    def _write_done(self, handle: _NixlHandle) -> None:
        self._release_nixl(handle)
        handle._finish(HandleState.DONE)

    def _write_failed(self, handle: _NixlHandle, peer: _Peer, exc: BaseException) -> None:
        # NIXL reported the request as failed: UCX no longer reads our memory. The peer's
        # regions may hold part of the data; it must not wait for a DONE that never comes.
        self._release_nixl(handle)
        if _is_disconnect(exc):
            self._peer_lost(peer, f"peer {peer.rank} lost: {exc}")
            handle._finish(HandleState.FAILED, f"peer {peer.rank} lost during the WRITE: {exc}")
            return
        self._refuse(peer, handle.tag, handle.adv_id, REFUSE_FAILED)
        handle._finish(HandleState.FAILED, f"NIXL WRITE failed: {exc}")

    def _release_nixl(self, handle: _NixlHandle) -> None:
        """Free the NIXL request and descriptor lists of a handle whose WRITE is final (or
        was never posted); never called on an active request."""
        xfer, handle.xfer = handle.xfer, None
        lists, handle.dlists = handle.dlists, ()
        for item in (xfer, *lists):
            if item is None:
                continue
            try:
                item.release()
            except Exception:  # a failed request may refuse; NIXL frees it with the agent
                pass

    # -- cancellation ----------------------------------------------------------------------

    def _cancel(self, handle: _NixlHandle) -> bool:
        if handle.final or handle.kind is HandleKind.RECV or handle.phase != "waiting":
            # A receive's memory is the peer's to write (see retract()); a posted WRITE
            # cannot be proven stopped, so it runs to NIXL's final status.
            return False
        queue = self._peers[handle.peer].waiting_sends.get(handle.tag)
        if queue is not None and handle in queue:
            queue.remove(handle)
            if not queue:
                del self._peers[handle.peer].waiting_sends[handle.tag]
        handle._finish(HandleState.FAILED, "cancelled")
        return True

    def _retract(self, handle: _NixlHandle) -> bool:
        if handle.final or handle.kind is not HandleKind.RECV or handle.phase != "advertised":
            return False
        handle.phase = "retracting"
        self._notify(self._peers[handle.peer],
                     encode_notification(KIND_RETRACT, handle.tag, handle.adv_id))
        return True

    # -- progress --------------------------------------------------------------------------

    def _advance(self) -> None:
        self._pump()
        if self._posted:
            still: list[_NixlHandle] = []
            for handle in self._posted:
                if handle.final:
                    continue
                peer = self._peers[handle.peer]
                try:
                    status = self._agent.check_xfer_state(handle.xfer)
                except Exception as exc:
                    self._write_failed(handle, peer, exc)
                    continue
                if status == "DONE":
                    self._write_done(handle)
                elif status == "ERR":
                    self._write_failed(handle, peer, RuntimeError("check_xfer_state: ERR"))
                else:
                    still.append(handle)
            self._posted = still
        now = time.monotonic()
        self._probe(now)
        if self._fencing:
            waiting = []
            for handle in self._fencing:
                if handle.final:
                    continue
                if now >= handle.fence_until:
                    self._peers[handle.peer].recvs.pop(handle.adv_id, None)
                    handle._finish(HandleState.FAILED, self._peers[handle.peer].lost_reason)
                else:
                    waiting.append(handle)
            self._fencing = waiting

    def _probe(self, now: float) -> None:
        for peer in self._peers.values():
            if peer.lost_reason is not None or now < peer.next_probe:
                continue
            if not (peer.recvs or peer.waiting_sends
                    or any(h.peer == peer.rank for h in self._posted)):
                continue
            peer.next_probe = now + self.probe_interval_s
            self._notify(peer, encode_notification(KIND_PING))

    def _notify(self, peer: _Peer, message: bytes) -> None:
        if peer.lost_reason is not None:
            return
        try:
            self._agent.send_notif(peer.name, message)
        except Exception as exc:  # a peer we cannot reach is gone: see _peer_lost
            self._peer_lost(peer, f"peer {peer.rank} lost: {exc}")

    def _peer_lost(self, peer: _Peer, reason: str) -> None:
        if peer.lost_reason is not None:
            return
        peer.lost_reason = reason
        peer.adverts.clear()
        for queue in peer.waiting_sends.values():
            for handle in queue:
                handle._finish(HandleState.FAILED, reason)  # nothing was written
        peer.waiting_sends.clear()
        fence_until = time.monotonic() + self.fence_grace_s
        for handle in peer.recvs.values():
            if handle.phase != "fencing":
                handle.phase = "fencing"
                handle.fence_until = fence_until
                self._fencing.append(handle)

    def _pump(self) -> None:
        """Drain NIXL's notifications (this also progresses UCX) and act on each."""
        try:
            notifications = self._agent.get_new_notifs()
        except Exception:
            return
        for name, messages in notifications.items():
            peer = self._by_name.get(name if isinstance(name, str) else bytes(name).decode())
            if peer is None:
                self.dropped_messages += len(messages)
                continue
            for message in messages:
                try:
                    kind, fields = decode_notification(message)
                except ProtocolError:
                    self.dropped_messages += 1
                    continue
                self._handle_notification(peer, kind, fields)

    def _handle_notification(self, peer: _Peer, kind: int, fields: tuple[Any, ...]) -> None:
        if kind == KIND_CONTROL:
            if not self._closed:
                self._inbox.append((peer.rank, fields[0]))
        elif kind == KIND_ADVERTISE:
            tag, adv_id, nbytes, device, addresses, lengths = fields
            advert = (adv_id, nbytes, device, addresses, lengths)
            sends = peer.waiting_sends.get(tag)
            if sends:
                send = sends.popleft()
                if not sends:
                    del peer.waiting_sends[tag]
                self._write(send, peer, advert)
            elif self._closed:
                self._refuse(peer, tag, adv_id, REFUSE_RETRACTED)
            else:
                peer.adverts.setdefault(tag, deque()).append(advert)
        elif kind == KIND_DONE:
            done = peer.recvs.get(fields[1])
            if done is None or done.tag != fields[0]:
                self.dropped_messages += 1
                return
            del peer.recvs[fields[1]]
            done._finish(HandleState.DONE)
        elif kind == KIND_REFUSE:
            tag, adv_id, reason = fields
            refused = peer.recvs.get(adv_id)
            if refused is None or refused.tag != tag:
                self.dropped_messages += 1
                return
            del peer.recvs[adv_id]
            refused._finish(HandleState.FAILED, REFUSE_REASONS[reason])
        elif kind == KIND_RETRACT:
            tag, adv_id = fields
            adverts = peer.adverts.get(tag, deque())
            for index, queued in enumerate(adverts):
                if queued[0] == adv_id:
                    del adverts[index]
                    if not adverts:
                        del peer.adverts[tag]
                    self._refuse(peer, tag, adv_id, REFUSE_RETRACTED)
                    break
            # Otherwise the WRITE was posted already: its DONE or REFUSE answers instead.
        elif kind == KIND_REGISTERED:
            try:
                self._agent.add_remote_agent(fields[0])
            except Exception:
                self.dropped_messages += 1
        # KIND_PING: a probe; receiving it is all it is for.

    def _refuse(self, peer: _Peer, tag: int, adv_id: int, reason: int) -> None:
        self._notify(peer, encode_notification(KIND_REFUSE, tag, adv_id, reason))

    # -- control channel -------------------------------------------------------------------

    def send_control(self, peer: int, payload: bytes) -> None:
        self._check_open("send_control")
        data = self._check_payload(payload)
        state = self._peers[self._check_peer(peer)]
        # A lost peer's control messages are dropped like a lost message; leases notice.
        self._notify(state, encode_notification(KIND_CONTROL, body=data))

    def recv_control(self) -> list[tuple[int, bytes]]:
        self._pump()
        out = list(self._inbox)
        self._inbox.clear()
        return out

    def peer_lost(self, peer: int) -> str | None:
        """Why ``peer`` is lost (a failed probe, post or notification), or ``None``."""
        return self._peers[self._check_peer(peer)].lost_reason

    # -- shutdown --------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Operations not yet final (their memory is still in use)."""
        return (sum(len(p.recvs) + sum(map(len, p.waiting_sends.values()))
                    for p in self._peers.values())
                + sum(1 for h in self._posted if not h.final))

    def close(self) -> None:
        """Refuse new operations, cancel sends still waiting for an advertisement and
        retract advertised receives (they finish when the peer answers, or after the fencing
        grace if it is lost); posted WRITEs run to their final status. Registered memory is
        deregistered by ``release_memory()`` once nothing is pending."""
        if not self._begin_close():
            return
        for peer in self._peers.values():
            for queue in list(peer.waiting_sends.values()):
                for handle in list(queue):
                    self._cancel(handle)
            for tag, adverts in list(peer.adverts.items()):
                for advert in adverts:
                    self._refuse(peer, tag, advert[0], REFUSE_RETRACTED)
            peer.adverts.clear()
            for handle in list(peer.recvs.values()):
                self._retract(handle)
        self._inbox.clear()
        self._advance()

    def release_memory(self) -> bool:
        """After ``close()``: deregister every tensor once no operation is pending; ``False``
        (nothing changed) while one still is."""
        if not self._closed or self.pending:
            return False
        for _, _, _, reg in self._registered:
            try:
                self._agent.deregister_memory(reg)
            except Exception:
                pass
        self._registered.clear()
        return True


def _import_nixl() -> Any:
    try:
        import nixl_cu13 as nixl
    except ImportError as exc:
        raise TransportUnavailableError("nixl", f"{INSTALL_HINT} ({exc})") from None
    return nixl


def _memory_type(device: torch.device) -> tuple[str, int]:
    if device.type == "cpu":
        return "DRAM", 0
    if device.type == "cuda":
        return "VRAM", _device_id(device)
    raise InvalidBufferError(f"NixlTransport moves CPU or CUDA memory, not {device}",
                             device=str(device))


def _device_id(device: torch.device) -> int:
    return 0 if device.type == "cpu" else (device.index or 0)


def _checked_tensor(tensor: object) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
        raise InvalidBufferError("register takes non-empty torch tensors")
    _memory_type(tensor.device)
    return tensor


def _whole(view: torch.Tensor) -> Regions:
    """One region covering a contiguous byte view."""
    return Regions(np.array([view.data_ptr()], dtype=np.uint64),
                   np.array([view.numel()], dtype=np.uint64), view.device, (view,),
                   view.numel())


def _is_disconnect(exc: BaseException) -> bool:
    return "Disconnect" in type(exc).__name__ or "REMOTE_DISCONNECT" in str(exc)
