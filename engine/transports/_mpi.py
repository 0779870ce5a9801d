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

mpi4py is imported when a transport is created, never at package import.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from kvhandoff.engine.transports._base import (
    CONTROL_TAG,
    MAX_TAG,
    HandleKind,
    HandleState,
    Transport,
    TransportHandle,
)
from kvhandoff.engine.transports._regions import Regions
from kvhandoff.engine.transports.errors import InvalidBufferError, TransportUnavailableError

__all__ = ["MPITransport"]

# recv_control takes at most this many messages per call, so a flood cannot stall a tick.
_MAX_CONTROL_PER_CALL = 4096
# An MPI block length is a C int: longer regions are described as several.
_MAX_REGION_BYTES = 2**31 - 1


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


class MPITransport(Transport):
    """Point-to-point over MPI on a duplicate of ``comm`` (default ``COMM_WORLD``).

    Creating it is collective over ``comm`` (``MPI_Comm_dup``). Buffers are CPU
    tensors; CUDA tensors are accepted only with ``cuda_aware=True`` (an MPI built with CUDA
    support). Receives can be cancelled, sends cannot (``cancellable_kinds == {RECV}``).
    ``max_tag`` is the MPI implementation's ``TAG_UB`` (at least 32767). Regions move
    natively (``moves_regions``), as one derived datatype per operation; while any is
    pending, ``poll()`` tests for up to ``progress_spin_s`` (see the module docstring).
    """

    cancellable_kinds = frozenset({HandleKind.RECV})
    moves_regions = True
    # MPICH packs a derived datatype through its shared-memory cells a few at a time, while a
    # contiguous message is one copy: measured, the pipelined staged path is faster at every
    # region size tried (docs/benchmarks.md), so the engine takes it unless told otherwise.
    region_min_bytes = 1 << 40

    def __init__(self, comm: Any = None, *, cuda_aware: bool = False,
                 progress_spin_s: float = 0.002) -> None:
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
        return [i for i, request in enumerate(self._requests) if not request]

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
        self._advance()


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
