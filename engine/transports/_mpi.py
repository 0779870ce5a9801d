"""MPI transport: mpi4py on a communicator of its own, polled with ``Testsome``.

The transport duplicates the communicator it is given, so its tags can never match the host
program's messages, and sets ``MPI.ERRORS_RETURN`` on the duplicate so an MPI error becomes a
failed handle instead of aborting the job. Data moves with ``Isend``/``Irecv`` straight from
the tensor's memory (no copy, ``MPI.BYTE``, so the dtype does not matter). ``poll()`` runs one
``MPI_Testsome`` over the pending requests. Control messages are ``Isend``s on tag 0, received
with ``Improbe`` + ``Mrecv`` (a matched probe, so two threads can never steal each other's
message); only raw bytes cross, never pickles (mpi4py's lower-case methods are never used).

Regions (``moves_regions``): ``post_send_regions`` / ``post_recv_regions`` describe the
regions to MPI as one ``hindexed`` datatype over absolute addresses (``MPI.BOTTOM``), so MPI
reads the sender's blocks and writes the receiver's blocks where they are, with no staging
buffer in between. The datatype is committed when the operation is posted and freed when it
is final. The message's byte stream is the regions' bytes in order, the same as a buffer of
them packed, so it matches a plain ``post_recv`` / ``post_send`` of that many bytes. Host
memory only (device regions need ``cuda_aware=True``).

One copy on one host (cross-memory attach, ``_cma``). MPICH gives only contiguous messages
its single-copy path; a derived datatype crawls through shared-memory cells. So between two
ranks on one host that may read each other's memory (probed once at construction: a rank
reads a token its peer published with ``process_vm_readv``; both directions must work), every
data operation, buffer or regions, moves by cross-memory read instead: a send posts a
*descriptor* of its regions (a buffer is one region) on its data tag and stays PENDING; the
matching receive (``Improbe`` + ``Mrecv`` on that peer and tag, so same-tag operations match in
posting order) validates it, reads the sender's regions straight into its own in one pass
(in ``poll()``, on the thread that drives the transport), and answers with an ack on the
transport's second communicator; the send is final only when that ack arrives, so the
sender's memory is never reused while the peer may still read it. Both sides of a pair agree
on the path at construction, so a receiver always knows whether a descriptor or raw data
comes. A descriptor of the wrong size fails the receive (``size mismatch``) and, through
the ack, the send; a sender that dies mid-copy fails the receive (``CrossMemoryError``); a
receiver that dies leaves the send pending, as any MPI send. A receive can be cancelled until
its descriptor arrives. With every peer on the CMA path the engine is told to take the region
path for regions of at least 4 KiB (``region_min_bytes``; smaller ones still gather, since the
kernel's cost per iovec outweighs their bytes); otherwise (remote peers, ``use_cma=False``, the
``KVHANDOFF_MPI_CMA=0`` environment, ``cuda_aware=True``, no ptrace permission) nothing
changes and ``cma_unavailable`` says why; with logging on (``configure_logging``) the
transport also writes one ``transport.cma_unavailable`` line per peer it could not agree the
path with, at construction, with that peer's reason.

mpi4py is imported when a transport is created, never at package import.
"""

from __future__ import annotations

import collections
import itertools
import os
import time
from typing import Any

import numpy as np
import torch
from kvhandoff.collectives import logging_enabled, rank_logger
from kvhandoff.engine.transports import _cma
from kvhandoff.engine.transports._base import (
    CONTROL_TAG,
    MAX_TAG,
    HandleKind,
    HandleState,
    Transport,
    TransportHandle,
)
from kvhandoff.engine.transports._regions import Regions
from kvhandoff.engine.transports.errors import (
    CrossMemoryError,
    DescriptorError,
    InvalidBufferError,
    TransportUnavailableError,
)

__all__ = ["MPITransport"]

# recv_control takes at most this many messages per call, so a flood cannot stall a tick.
_MAX_CONTROL_PER_CALL = 4096
# An MPI block length is a C int: longer regions are described as several.
_MAX_REGION_BYTES = 2**31 - 1
# The engine's region path on the cross-memory path, for regions of at least this average.
# process_vm_readv costs about half a microsecond per iovec on top of the copy (pinning the
# peer's pages one region at a time): 256 B regions read at ~0.15 of the contiguous rate,
# slower than gather + one contiguous read + scatter, while 32 KiB regions read at ~0.8 of
# it, faster (docs/benchmarks.md, data plane). The crossover is a few KiB.
_CMA_REGION_MIN_BYTES = 4 << 10
# Set to 0 to keep every peer off the cross-memory path (same as use_cma=False).
CMA_ENV = "KVHANDOFF_MPI_CMA"


class _MPIHandle(TransportHandle):
    def __init__(self, owner: MPITransport, kind: HandleKind, peer: int, tag: int,
                 nbytes: int, data: object, request: Any, datatype: Any = None) -> None:
        super().__init__(kind, peer, tag, nbytes, owner._ready.append)
        self._owner = owner
        self._buffer = data  # MPI reads/writes it (a tensor or Regions) until final
        self.request = request
        # The committed datatype of a region operation, freed when the operation is final.
        self.datatype = datatype
        self.cancel_requested = False

    def _progress(self) -> None:
        self._owner._advance()

    def cancel(self) -> bool:
        # MPI can cancel a receive that has not matched; cancelling sends is deprecated in
        # MPI-4 and unreliable, so sends stay pending until the peer receives them.
        if self.final or self.kind is HandleKind.SEND:
            return False
        if not self.cancel_requested:
            self.cancel_requested = True
            self.request.Cancel()
        return True


class _CMASendHandle(TransportHandle):
    """A send on the cross-memory path: final when the receiver's ack arrives."""

    def __init__(self, owner: MPITransport, peer: int, tag: int, nbytes: int, data: object,
                 op_id: int) -> None:
        super().__init__(HandleKind.SEND, peer, tag, nbytes, owner._ready.append)
        self._owner = owner
        self._buffer = data  # the peer may read it until its ack arrives
        self.op_id = op_id

    def _progress(self) -> None:
        self._owner._advance()

    def cancel(self) -> bool:
        return False  # the descriptor may already be in the peer's hands: like an MPI send


class _CMARecvHandle(TransportHandle):
    """A receive on the cross-memory path: waits for its descriptor, then copies."""

    def __init__(self, owner: MPITransport, peer: int, tag: int, nbytes: int, data: object,
                 addresses: np.ndarray, lengths: np.ndarray) -> None:
        super().__init__(HandleKind.RECV, peer, tag, nbytes, owner._ready.append)
        self._owner = owner
        self._buffer = data
        self.addresses = addresses
        self.lengths = lengths
        self.matched = False

    def _progress(self) -> None:
        self._owner._advance()

    def cancel(self) -> bool:
        if self.final or self.matched:
            return False
        self._owner._cancel_cma_recv(self)
        return True


class MPITransport(Transport):
    """Point-to-point over MPI on a duplicate of ``comm`` (default ``COMM_WORLD``).

    Creating it is collective over ``comm`` (``MPI_Comm_dup``). Buffers are CPU
    tensors; CUDA tensors are accepted only with ``cuda_aware=True`` (an MPI built with CUDA
    support). Receives can be cancelled, sends cannot (``cancellable_kinds == {RECV}``).
    ``max_tag`` is the MPI implementation's ``TAG_UB`` (at least 32767). Regions move
    natively (``moves_regions``), as one derived datatype per operation; while any is
    pending, ``poll()`` tests for up to ``progress_spin_s`` (see the module docstring).

    Peers on this host move by cross-memory read (module docstring) unless ``use_cma`` is
    False (default: on, unless the environment sets ``KVHANDOFF_MPI_CMA=0``); ``cma_peers``
    are the ranks it works with, ``cma_unavailable`` why it does not with the rest (None when
    it works with every peer). Creating the transport probes it, collectively.
    """

    cancellable_kinds = frozenset({HandleKind.RECV})
    moves_regions = True
    # MPICH packs a derived datatype through its shared-memory cells a few at a time, while a
    # contiguous message is one copy: measured, the pipelined staged path is faster at every
    # region size tried (docs/benchmarks.md), so the engine takes it unless told otherwise;
    # a transport whose every peer is on the one-copy path lowers it (_CMA_REGION_MIN_BYTES).
    region_min_bytes = 1 << 40

    def __init__(self, comm: Any = None, *, cuda_aware: bool = False,
                 progress_spin_s: float = 0.002, use_cma: bool | None = None) -> None:
        super().__init__()
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise TransportUnavailableError(
                "mpi", f"install with `pip install kvhandoff[mpi]` ({exc})"
            ) from None
        self._mpi = MPI
        self._comm = (MPI.COMM_WORLD if comm is None else comm).Dup()
        self._comm.Set_name("kvhandoff.transport")
        self._comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.rank = self._comm.Get_rank()
        self.world_size = self._comm.Get_size()
        tag_ub: Any = self._comm.Get_attr(MPI.TAG_UB)
        self.max_tag = min(int(tag_ub), MAX_TAG)
        self.cuda_aware = cuda_aware
        if not progress_spin_s >= 0:
            raise ValueError(f"progress_spin_s must be >= 0, got {progress_spin_s!r}")
        self.progress_spin_s = float(progress_spin_s)
        self._regions_pending = 0
        # Parallel lists: Testsome wants the requests as one sequence; swap-remove keeps
        # both O(1) per completion.
        self._requests: list[Any] = []
        self._pending: list[_MPIHandle] = []
        self._statuses: list[Any] = []
        self._control_requests: list[Any] = []
        self._control_payloads: list[bytes] = []
        # The cross-memory path: acks travel on a communicator of their own so they can
        # never match a data receive (both sides choose data tags).
        self._ack_comm = self._comm.Dup()
        self._ack_comm.Set_name("kvhandoff.transport.ack")
        self._ack_comm.Set_errhandler(MPI.ERRORS_RETURN)
        self._pid = os.getpid()
        self._op_ids = itertools.count(1)
        self._cma_sends: dict[tuple[int, int], _CMASendHandle] = {}  # (peer, op id)
        self._cma_recvs: dict[tuple[int, int], collections.deque[_CMARecvHandle]] = {}
        self._descriptor_requests: list[Any] = []
        self._descriptor_sends: list[tuple[_CMASendHandle, bytes]] = []
        #: Messages on the ack communicator that matched no send of ours, or were no ack.
        self.cma_dropped_acks = 0
        self.cma_peers, self.cma_unavailable, why_not = self._negotiate_cma(use_cma)
        if why_not and logging_enabled():
            log = rank_logger(self.rank)
            for peer, why in sorted(why_not.items()):
                log.info("transport.cma_unavailable", peer=peer, reason=why)
        if self.world_size > 1 and len(self.cma_peers) == self.world_size - 1:
            # One copy, blocks where they are, beats gather + move + scatter while the
            # kernel's cost per iovec is small next to the region's bytes (measured).
            self.region_min_bytes = _CMA_REGION_MIN_BYTES

    def _negotiate_cma(self, use_cma: bool | None,
                       ) -> tuple[frozenset[int], str | None, dict[int, str]]:
        """The peers both directions of a cross-memory read work with, why not with the
        others (one line, and per peer); collective over the communicator."""
        MPI = self._mpi
        if use_cma is None:
            use_cma = os.environ.get(CMA_ENV, "1") != "0"
        reason = None
        if not use_cma:
            reason = f"disabled (use_cma=False or {CMA_ENV}=0)"
        elif self.cuda_aware:
            reason = "cuda_aware=True: device memory cannot be read across processes"
        else:
            reason = _cma.available()
        local = self._comm.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            size, me = local.Get_size(), local.Get_rank()
            token = np.frombuffer(os.urandom(8), dtype=np.uint64) | np.uint64(1)
            mine = np.array([reason is None, self._pid, token.ctypes.data, int(token[0]),
                             self.rank], dtype=np.uint64)
            table = np.empty((size, len(mine)), dtype=np.uint64)
            local.Allgather([mine, MPI.UINT64_T], [table, MPI.UINT64_T])
            works = np.zeros(size, dtype=np.uint8)
            probe_failed: dict[int, str] = {}  # local index -> why this rank cannot read it
            for j in range(size):
                if j == me or reason is not None or not table[j, 0]:
                    continue
                why = _probe(int(table[j, 1]), int(table[j, 2]), int(table[j, 3]))
                if why is None:
                    works[j] = 1
                else:
                    probe_failed[j] = why
            grid = np.empty((size, size), dtype=np.uint8)
            local.Allgather([works, MPI.UINT8_T], [grid, MPI.UINT8_T])
        finally:
            local.Free()
        peers = frozenset(int(table[j, 4]) for j in range(size)
                          if j != me and grid[me, j] and grid[j, me])
        if len(peers) == self.world_size - 1:
            return peers, None, {}
        if reason is not None:  # this side's own: it holds for every peer
            return peers, reason, {r: reason for r in range(self.world_size) if r != self.rank}
        local_ranks = {int(table[j, 4]) for j in range(size)}
        why_not = {r: "on another host" for r in range(self.world_size) if r not in local_ranks}
        failures, off, refused = [], [], []
        for j in range(size):
            peer = int(table[j, 4])
            if j == me or peer in peers:
                continue
            if j in probe_failed:
                why_not[peer] = probe_failed[j]
                failures.append(f"rank {peer}: {probe_failed[j]}")
            elif not table[j, 0]:  # disabled, or unavailable, on the peer's side
                why_not[peer] = "off on that rank's side"
                off.append(peer)
            else:  # this rank read the peer, the peer could not read this one
                why_not[peer] = "that rank cannot read this one"
                refused.append(peer)
        remote = len(why_not) - len(failures) - len(off) - len(refused)
        reason = "; ".join(
            failures + ([f"{remote} ranks on other hosts"] if remote else [])
            + ([f"ranks {refused} cannot read this one"] if refused else [])
            + ([f"off on the side of ranks {off}"] if off else []))
        return peers, reason, why_not

    @property
    def comm(self) -> Any:
        """The transport's own duplicated communicator."""
        return self._comm

    def post_send(self, buf: torch.Tensor, peer: int, tag: int) -> TransportHandle:
        return self._post(HandleKind.SEND, buf, peer, tag)

    def post_recv(self, buf: torch.Tensor, peer: int, tag: int) -> TransportHandle:
        return self._post(HandleKind.RECV, buf, peer, tag)

    def _post(self, kind: HandleKind, buf: torch.Tensor, peer: int, tag: int) -> TransportHandle:
        peer, tag, data = self._check_post(kind, buf, peer, tag)
        spec = [self._buffer_spec(data), self._mpi.BYTE]
        if peer in self.cma_peers:  # one region: the peer's side is uniform
            return self._post_cma(kind, peer, tag, data.numel(), data,
                                  np.array([data.data_ptr()], dtype=np.uint64),
                                  np.array([data.numel()], dtype=np.uint64))
        if kind is HandleKind.SEND:
            request = self._comm.Isend(spec, dest=peer, tag=tag)
        else:
            request = self._comm.Irecv(spec, source=peer, tag=tag)
        return self._track(_MPIHandle(self, kind, peer, tag, data.numel(), data, request))

    def post_send_regions(self, regions: Regions, peer: int, tag: int) -> TransportHandle:
        return self._post_regions(HandleKind.SEND, regions, peer, tag)

    def post_recv_regions(self, regions: Regions, peer: int, tag: int) -> TransportHandle:
        return self._post_regions(HandleKind.RECV, regions, peer, tag)

    def _post_regions(self, kind: HandleKind, regions: Regions, peer: int,
                      tag: int) -> TransportHandle:
        self._check_open(f"post_{kind.value}_regions")
        peer, tag = self._check_peer(peer), self._check_tag(tag)
        if not isinstance(regions, Regions) or regions.nbytes <= 0:
            raise InvalidBufferError(
                f"regions must be a non-empty Regions (block_regions), not {regions!r}")
        if regions.device.type != "cpu" and not self.cuda_aware:
            raise InvalidBufferError(
                f"MPITransport got {regions.device} regions but MPI is not CUDA-aware: stage "
                "them through host memory, or pass cuda_aware=True with a CUDA-aware MPI",
                device=str(regions.device))
        if peer in self.cma_peers:
            return self._post_cma(kind, peer, tag, regions.nbytes, regions, regions.addresses,
                                  regions.lengths)
        MPI = self._mpi
        lengths, addresses = _mpi_blocks(regions)
        datatype = MPI.BYTE.Create_hindexed(lengths, addresses).Commit()
        try:
            spec = [MPI.BOTTOM, 1, datatype]
            if kind is HandleKind.SEND:
                request = self._comm.Isend(spec, dest=peer, tag=tag)
            else:
                request = self._comm.Irecv(spec, source=peer, tag=tag)
        except BaseException:
            datatype.Free()
            raise
        self._regions_pending += 1
        return self._track(_MPIHandle(self, kind, peer, tag, regions.nbytes, regions, request,
                                      datatype))

    def _post_cma(self, kind: HandleKind, peer: int, tag: int, nbytes: int, data: object,
                  addresses: np.ndarray, lengths: np.ndarray) -> TransportHandle:
        if len(lengths) > _cma.MAX_REGIONS or nbytes > _cma.MAX_NBYTES:
            raise InvalidBufferError(
                f"{len(lengths)} regions / {nbytes} bytes is more than one cross-memory "
                f"operation describes ({_cma.MAX_REGIONS} regions, {_cma.MAX_NBYTES} bytes): "
                "split it (Regions.split)")
        if kind is HandleKind.RECV:
            receive = _CMARecvHandle(self, peer, tag, nbytes, data, addresses, lengths)
            self._cma_recvs.setdefault((peer, tag), collections.deque()).append(receive)
            return receive
        op_id = next(self._op_ids)
        payload = _cma.encode_descriptor(op_id, self._pid, addresses, lengths)
        request = self._comm.Isend([payload, self._mpi.BYTE], dest=peer, tag=tag)
        send = _CMASendHandle(self, peer, tag, nbytes, data, op_id)
        self._cma_sends[(peer, op_id)] = send
        self._descriptor_requests.append(request)
        self._descriptor_sends.append((send, payload))
        return send

    def _cancel_cma_recv(self, handle: _CMARecvHandle) -> None:
        key = (handle.peer, handle.tag)
        queue = self._cma_recvs[key]
        queue.remove(handle)
        if not queue:
            del self._cma_recvs[key]
        handle._finish(HandleState.FAILED, "cancelled")

    def _advance_cma(self) -> None:
        """Settle descriptor sends, take acks, and serve receives whose descriptor came."""
        MPI = self._mpi
        status = MPI.Status()
        if self._descriptor_requests:
            self._reap_descriptor_sends()
        while self._cma_sends:
            try:
                message = self._ack_comm.Improbe(MPI.ANY_SOURCE, MPI.ANY_TAG, status)
            except MPI.Exception:  # a lost peer: its sends stay pending, as MPI's do
                break
            if message is None:
                break
            payload = bytearray(status.Get_count(MPI.BYTE))
            message.Recv([payload, MPI.BYTE])
            try:
                op_id, reason = _cma.decode_ack(payload)
            except DescriptorError:
                # Not an ack (another kvhandoff version): dropped like a lost message; the
                # send it was for stays pending until the engine's deadline settles it.
                self.cma_dropped_acks += 1
                continue
            send = self._cma_sends.pop((status.Get_source(), op_id), None)
            if send is None:  # an ack for no send of ours (the peer answered a forgery)
                self.cma_dropped_acks += 1
                continue
            send._finish(HandleState.DONE if reason is None else HandleState.FAILED, reason)
        for key in list(self._cma_recvs):
            queue = self._cma_recvs[key]
            while queue:
                try:
                    message = self._comm.Improbe(key[0], key[1], status)
                except MPI.Exception as exc:  # as a failed Irecv: every receive from it
                    while queue:
                        queue.popleft()._finish(HandleState.FAILED, f"MPI error: {exc}")
                    break
                if message is None:
                    break
                payload = bytearray(status.Get_count(MPI.BYTE))
                message.Recv([payload, MPI.BYTE])
                self._copy_in(queue.popleft(), payload)
            if not queue:
                del self._cma_recvs[key]

    def _reap_descriptor_sends(self) -> None:
        MPI = self._mpi
        statuses = [MPI.Status() for _ in self._descriptor_requests]
        try:
            indices = MPI.Request.Testsome(self._descriptor_requests, statuses)
        except MPI.Exception:
            indices = self._completed_after_error_in(self._descriptor_requests)
        if not indices:
            return
        done = set(indices)
        for k, i in enumerate(indices):
            error = statuses[k].Get_error()
            send = self._descriptor_sends[i][0]
            if error != MPI.SUCCESS and self._cma_sends.pop((send.peer, send.op_id), None):
                send._finish(HandleState.FAILED, f"MPI error: {MPI.Get_error_string(error)}")
        self._descriptor_requests = [r for i, r in enumerate(self._descriptor_requests)
                                     if i not in done]
        self._descriptor_sends = [s for i, s in enumerate(self._descriptor_sends)
                                  if i not in done]

    def _copy_in(self, receive: _CMARecvHandle, payload: bytearray) -> None:
        """Serve ``receive`` from the descriptor in ``payload``: validate, copy, ack."""
        receive.matched = True
        op_id: int | None = None
        error = reason = None
        try:
            descriptor = _cma.decode_descriptor(payload)
            op_id = descriptor.op_id
            if descriptor.nbytes != receive.nbytes:
                error = (f"size mismatch: received {descriptor.nbytes} bytes into a "
                         f"{receive.nbytes}-byte buffer")
                reason = (f"size mismatch: sent {descriptor.nbytes} bytes to a "
                          f"{receive.nbytes}-byte receive")
            else:
                local, remote = _cma.segments(receive.addresses, receive.lengths,
                                              descriptor.addresses, descriptor.lengths)
                _cma.read(descriptor.pid, local, remote)
        except DescriptorError as exc:
            error = reason = str(exc)
            op_id = _cma.peek_op_id(payload)
        except CrossMemoryError as exc:
            error = reason = str(exc)
        if op_id is not None:
            ack = _cma.encode_ack(op_id, reason)
            try:
                request = self._ack_comm.Isend([ack, self._mpi.BYTE], dest=receive.peer,
                                               tag=receive.tag)
            except self._mpi.Exception:
                pass  # the sender is gone: nothing waits for this ack any more
            else:
                self._control_requests.append(request)  # reaped with the control sends
                self._control_payloads.append(ack)
        receive._finish(HandleState.DONE if error is None else HandleState.FAILED, error)

    def _track(self, handle: _MPIHandle) -> _MPIHandle:
        self._requests.append(handle.request)
        self._pending.append(handle)
        return handle

    def _buffer_spec(self, data: torch.Tensor) -> Any:
        if data.device.type == "cpu":
            return data.detach().numpy()  # zero-copy view through the buffer protocol
        if not self.cuda_aware:
            raise InvalidBufferError(
                f"MPITransport got a {data.device} buffer but MPI is not CUDA-aware: stage "
                "it through host memory, or pass cuda_aware=True with a CUDA-aware MPI",
                device=str(data.device),
            )
        return data  # mpi4py takes device memory through DLPack / __cuda_array_interface__

    def _advance(self) -> None:
        self._reap_control_sends()
        if self._cma_sends or self._cma_recvs or self._descriptor_requests:
            self._advance_cma()
        if not self._requests:
            return
        if not (self._regions_pending and self.progress_spin_s):
            self._test_some()
            return
        # Derived-datatype messages progress a few cells per MPI call (module docstring).
        deadline = time.perf_counter() + self.progress_spin_s
        while not self._test_some() and self._regions_pending and \
                time.perf_counter() < deadline:
            pass

    def _test_some(self) -> bool:
        """One ``Testsome`` over the pending requests; True when any completed."""
        MPI = self._mpi
        statuses = self._statuses
        while len(statuses) < len(self._requests):
            statuses.append(MPI.Status())
        try:
            indices = MPI.Request.Testsome(self._requests, statuses)
        except MPI.Exception:
            indices = self._completed_after_error()
        if not indices:
            return False
        # Testsome fills statuses[k] for indices[k]; read every outcome before removal moves
        # entries around.
        outcomes = [(i, self._outcome(self._pending[i], statuses[k]))
                    for k, i in enumerate(indices)]
        for i, (state, error) in sorted(outcomes, key=lambda item: -item[0]):
            handle = self._pending[i]
            last = len(self._pending) - 1
            # Swap-remove in descending index order: the entry moved into slot i comes from
            # a slot above i, which is already processed or still pending.
            self._pending[i] = self._pending[last]
            self._requests[i] = self._requests[last]
            self._pending.pop()
            self._requests.pop()
            if handle.datatype is not None:
                handle.datatype.Free()
                handle.datatype = None
                self._regions_pending -= 1
            handle._finish(state, error)
        return True

    def _completed_after_error(self) -> list[int]:
        """After Testsome raised MPI_ERR_IN_STATUS, the completed requests are the ones now
        null; MPICH fills their statuses in ascending index order, which this relies on."""
        return self._completed_after_error_in(self._requests)

    @staticmethod
    def _completed_after_error_in(requests: list[Any]) -> list[int]:
        return [i for i, request in enumerate(requests) if not request]

    def _outcome(self, handle: _MPIHandle, status: Any) -> tuple[HandleState, str | None]:
        MPI = self._mpi
        error = status.Get_error()
        if error != MPI.SUCCESS:
            return HandleState.FAILED, f"MPI error: {MPI.Get_error_string(error)}"
        if status.Is_cancelled():
            return HandleState.FAILED, "cancelled"
        if handle.kind is HandleKind.RECV:
            count = status.Get_count(MPI.BYTE)
            if count != handle.nbytes:
                return HandleState.FAILED, (
                    f"size mismatch: received {count} bytes into a {handle.nbytes}-byte buffer"
                )
        return HandleState.DONE, None

    def send_control(self, peer: int, payload: bytes) -> None:
        self._check_open("send_control")
        data = self._check_payload(payload)
        peer = self._check_peer(peer)
        # The bytes object stays referenced until the request completes.
        request = self._comm.Isend([data, self._mpi.BYTE], dest=peer, tag=CONTROL_TAG)
        self._control_requests.append(request)
        self._control_payloads.append(data)
        self._reap_control_sends()

    def _reap_control_sends(self) -> None:
        if not self._control_requests:
            return
        try:
            indices = self._mpi.Request.Testsome(self._control_requests)
        except self._mpi.Exception:
            # A failed control send is dropped like a lost one; the peer's lease notices.
            indices = [i for i, request in enumerate(self._control_requests) if not request]
        if not indices:
            return
        done = set(indices)
        self._control_requests = [r for i, r in enumerate(self._control_requests) if i not in done]
        self._control_payloads = [p for i, p in enumerate(self._control_payloads) if i not in done]

    def recv_control(self) -> list[tuple[int, bytes]]:
        MPI = self._mpi
        out: list[tuple[int, bytes]] = []
        status = MPI.Status()
        for _ in range(_MAX_CONTROL_PER_CALL):
            message = self._comm.Improbe(MPI.ANY_SOURCE, CONTROL_TAG, status)
            if message is None:
                break
            payload = bytearray(status.Get_count(MPI.BYTE))
            # The message is already matched and small (eager), so this returns at once.
            message.Recv([payload, MPI.BYTE])
            out.append((status.Get_source(), bytes(payload)))
        return out

    def close(self) -> None:
        """Refuse new operations and cancel pending receives (their handles are still
        reported by ``poll()``); sends still waiting for their peer stay pending, with their
        buffers in use, until the peer receives them. The duplicated communicator is kept
        until MPI_Finalize: freeing it while a peer may still send to it would let a late
        message match a later communicator that reuses its context."""
        if not self._begin_close():
            return
        for handle in list(self._pending):
            handle.cancel()
        for queue in list(self._cma_recvs.values()):
            for receive in list(queue):
                receive.cancel()
        self._advance()


def _probe(pid: int, address: int, token: int) -> str | None:
    """None when 8 bytes at ``address`` of process ``pid`` read back as ``token``."""
    out = np.zeros(1, dtype=np.uint64)
    local = np.array([[out.ctypes.data, 8]], dtype=np.uint64)
    remote = np.array([[address, 8]], dtype=np.uint64)
    try:
        _cma.read(pid, local, remote)
    except CrossMemoryError as exc:
        return str(exc)
    if int(out[0]) != token:
        return f"pid {pid} is not the peer here (another pid namespace?)"
    return None


def _mpi_blocks(regions: Regions) -> tuple[list[int], list[int]]:
    """``(block lengths, absolute addresses)`` of an MPI ``hindexed`` type over ``regions``;
    a region longer than a C int is described as several consecutive ones."""
    lengths, addresses = regions.lengths, regions.addresses
    if int(lengths.max()) > _MAX_REGION_BYTES:
        pieces = (lengths + np.uint64(_MAX_REGION_BYTES - 1)) // np.uint64(_MAX_REGION_BYTES)
        owner = np.repeat(np.arange(len(lengths)), pieces.astype(np.int64))
        first = np.cumsum(pieces) - pieces
        index = (np.arange(len(owner)) - first[owner].astype(np.int64)).astype(np.uint64)
        offsets = index * np.uint64(_MAX_REGION_BYTES)
        addresses = addresses[owner] + offsets
        lengths = np.minimum(lengths[owner] - offsets, np.uint64(_MAX_REGION_BYTES))
    return lengths.tolist(), addresses.tolist()
