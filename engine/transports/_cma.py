"""Cross-memory attach: copy another process's scattered memory into ours in one pass.

Theory of operation. Two ranks on one host can move a message with one memory copy: the
receiver reads the sender's regions straight into its own with Linux ``process_vm_readv``
(called through ctypes on libc; ctypes releases the GIL for the call). It needs ptrace
permission over the sender (same uid, or root), so ``MPITransport`` probes it once at
construction and falls back to MPI datatypes when it does not work.

``read(pid, local, remote)`` copies the bytes of the ``remote`` regions of process ``pid``,
in order, into the ``local`` regions, in order (both lists describe the same number of
bytes). The two lists are cut at their common boundaries so that each segment is one iovec
on each side, then moved ``IOV_MAX`` (1024) segments per system call. A failed call
(``ESRCH``: the sender died; ``EFAULT``: its memory is gone) raises ``CrossMemoryError``.

The wire side: a send posts a *descriptor* (``encode_descriptor``) on its data tag: the op
id, the sender's pid, the byte count and the ``uint64`` address / length arrays, as raw bytes
(never a pickle). The receiver validates it (``decode_descriptor`` raises only
``DescriptorError``, whatever the bytes), copies, and answers with an *ack*
(``encode_ack``: done, or failed with a reason) on the transport's ack communicator; the
sender's memory may be read until that ack arrives.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_codes
import struct
import sys
from typing import Any

import attrs
import numpy as np
from kvhandoff.engine.transports._regions import common_cut
from kvhandoff.engine.transports.errors import CrossMemoryError, DescriptorError

__all__ = [
    "IOV_MAX",
    "Descriptor",
    "available",
    "decode_ack",
    "decode_descriptor",
    "encode_ack",
    "encode_descriptor",
    "read",
]

IOV_MAX = 1024
_DESCRIPTOR = struct.Struct("<4sHHQqQQ")  # magic, version, flags, op id, pid, nbytes, count
_DESCRIPTOR_MAGIC = b"KVCM"
_ACK = struct.Struct("<4sHHQ")  # magic, version, status, op id; then the reason as UTF-8
_ACK_MAGIC = b"KVCA"
_VERSION = 1
ACK_DONE, ACK_FAILED = 0, 1
# Bounds that keep every sum below 2**64: count * (largest length <= nbytes) fits.
MAX_REGIONS = 1 << 24
MAX_NBYTES = 1 << 39
MAX_REASON_BYTES = 1024
_U64_MAX = np.uint64(2**64 - 1)

_readv: Any = None


def _libc_readv() -> Any:
    """``process_vm_readv`` from libc, or None where there is none (not Linux, old libc)."""
    global _readv
    if _readv is None:
        function: Any = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
                function = libc.process_vm_readv
            except (OSError, AttributeError):
                function = False
            else:
                function.restype = ctypes.c_ssize_t
                function.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong,
                                     ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
        _readv = function
    return _readv or None


def available() -> str | None:
    """None when this process can call ``process_vm_readv``, else why not."""
    if _libc_readv() is None:
        return f"process_vm_readv is not available on {sys.platform}"
    return None


@attrs.frozen(eq=False)
class Descriptor:
    """A decoded send descriptor: the sender's regions ``(addresses[i], lengths[i])``."""

    op_id: int
    pid: int
    nbytes: int
    addresses: np.ndarray
    lengths: np.ndarray


def encode_descriptor(op_id: int, pid: int, addresses: np.ndarray,
                      lengths: np.ndarray) -> bytes:
    addresses = np.ascontiguousarray(addresses, dtype="<u8")
    lengths = np.ascontiguousarray(lengths, dtype="<u8")
    header = _DESCRIPTOR.pack(_DESCRIPTOR_MAGIC, _VERSION, 0, op_id, pid, int(lengths.sum()),
                              len(lengths))
    return header + addresses.tobytes() + lengths.tobytes()


def decode_descriptor(data: bytes | bytearray | memoryview) -> Descriptor:
    """The descriptor in ``data``; ``DescriptorError`` for anything else, before use."""
    data = memoryview(data).cast("B")
    size = _DESCRIPTOR.size
    if len(data) < size:
        raise DescriptorError(f"truncated: {len(data)} bytes, the header alone is {size}",
                              bytes(data))
    magic, version, flags, op_id, pid, nbytes, count = _DESCRIPTOR.unpack_from(data)
    if magic != _DESCRIPTOR_MAGIC:
        raise DescriptorError(f"bad magic {magic!r}", bytes(data))
    if version != _VERSION or flags != 0:
        raise DescriptorError(f"version {version} flags {flags}: this side speaks version "
                              f"{_VERSION} with no flags", bytes(data))
    if pid <= 0:
        raise DescriptorError(f"pid {pid} is not a process id", bytes(data))
    if not 1 <= count <= MAX_REGIONS or not 1 <= nbytes <= MAX_NBYTES:
        raise DescriptorError(f"count {count} / nbytes {nbytes} out of range (1..{MAX_REGIONS}"
                              f" regions, 1..{MAX_NBYTES} bytes)", bytes(data))
    if len(data) != size + 16 * count:
        raise DescriptorError(f"{len(data)} bytes for {count} regions: expected "
                              f"{size + 16 * count}", bytes(data))
    arrays = np.frombuffer(data, dtype="<u8", offset=size).astype(np.uint64)
    addresses, lengths = arrays[:count], arrays[count:]
    if int(lengths.min()) == 0 or int(lengths.max()) > nbytes:
        raise DescriptorError("a region is empty or longer than the message", bytes(data))
    if int(lengths.sum()) != nbytes:
        raise DescriptorError(f"regions hold {int(lengths.sum())} bytes, the header says "
                              f"{nbytes}", bytes(data))
    if np.any(addresses == 0) or np.any(addresses > _U64_MAX - lengths):
        raise DescriptorError("a region's address is null or wraps around", bytes(data))
    return Descriptor(op_id, pid, nbytes, addresses, lengths)


def peek_op_id(data: bytes | bytearray | memoryview) -> int | None:
    """The op id of a descriptor whose header is sound, even if the rest is not (so the
    sender can be told); None when the header itself is not a descriptor's."""
    if len(data) < _DESCRIPTOR.size:
        return None
    magic, version, _, op_id, *_ = _DESCRIPTOR.unpack_from(data)
    return int(op_id) if magic == _DESCRIPTOR_MAGIC and version == _VERSION else None


def encode_ack(op_id: int, reason: str | None) -> bytes:
    """The receiver's answer to descriptor ``op_id``: done (``reason`` None) or failed."""
    if reason is None:
        return _ACK.pack(_ACK_MAGIC, _VERSION, ACK_DONE, op_id)
    text = reason.encode("utf-8")[:MAX_REASON_BYTES]
    return _ACK.pack(_ACK_MAGIC, _VERSION, ACK_FAILED, op_id) + text


def decode_ack(data: bytes | bytearray | memoryview) -> tuple[int, str | None]:
    """``(op id, failure reason or None)``; ``DescriptorError`` for anything else."""
    data = bytes(data)
    if len(data) < _ACK.size or len(data) > _ACK.size + MAX_REASON_BYTES:
        raise DescriptorError(f"an ack of {len(data)} bytes", data)
    magic, version, status, op_id = _ACK.unpack_from(data)
    if magic != _ACK_MAGIC or version != _VERSION or status not in (ACK_DONE, ACK_FAILED):
        raise DescriptorError(f"bad ack header {magic!r} v{version} status {status}", data)
    if status == ACK_DONE:
        if len(data) != _ACK.size:
            raise DescriptorError("a done ack carries a reason", data)
        return op_id, None
    return op_id, data[_ACK.size:].decode("utf-8", errors="replace") or "failed"


def segments(local_addresses: np.ndarray, local_lengths: np.ndarray,
             remote_addresses: np.ndarray, remote_lengths: np.ndarray,
             ) -> tuple[np.ndarray, np.ndarray]:
    """Both region lists cut at their common boundaries (``_regions.common_cut``): two
    ``[n, 2]`` ``uint64`` iovec arrays (base, length) whose rows have equal lengths. Both
    lists hold the same bytes."""
    local_base, remote_base, lengths = common_cut(local_addresses, local_lengths,
                                                  remote_addresses, remote_lengths)
    local = np.empty((len(lengths), 2), dtype=np.uint64)
    remote = np.empty((len(lengths), 2), dtype=np.uint64)
    local[:, 0], local[:, 1] = local_base, lengths
    remote[:, 0], remote[:, 1] = remote_base, lengths
    return local, remote


def read(pid: int, local: np.ndarray, remote: np.ndarray) -> None:
    """Copy the segments ``remote`` (``[n, 2]`` iovecs of process ``pid``) into ``local``
    (``segments`` gives both); ``CrossMemoryError`` if the kernel refuses. ``local`` and
    ``remote`` are consumed (a short read advances them in place)."""
    function = _libc_readv()
    if function is None:
        raise CrossMemoryError(pid, errno_codes.ENOSYS, 0)
    rows, done, position = len(local), 0, 0
    local_base, remote_base = local.ctypes.data, remote.ctypes.data
    while position < rows:
        count = min(IOV_MAX, rows - position)
        want = int(local[position:position + count, 1].sum())
        got = function(pid, local_base + 16 * position, count,
                       remote_base + 16 * position, count, 0)
        if got < 0:
            raise CrossMemoryError(pid, ctypes.get_errno(), done)
        done += got
        if got == want:
            position += count
            continue
        if got == 0:
            raise CrossMemoryError(pid, errno_codes.EFAULT, done)
        # A short read stops inside the chunk: skip the whole segments it moved, shorten the
        # one it stopped in, and go on from there (a real fault fails the next call).
        moved = np.cumsum(local[position:position + count, 1])
        whole = int(np.searchsorted(moved, got, side="right"))
        position += whole
        partial = got - (int(moved[whole - 1]) if whole else 0)
        if partial:
            for iov in (local, remote):
                iov[position, 0] += np.uint64(partial)
                iov[position, 1] -= np.uint64(partial)
