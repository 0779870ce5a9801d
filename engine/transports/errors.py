"""Every exception raised by ``kvhandoff.engine.transports`` and by the control-message wire
format (``kvhandoff.engine._wire``).

Two families:

- ``TransportError``: a caller misused a transport (bad buffer, bad tag, unknown peer, a
  closed transport) or a backend is not installed. These are raised synchronously by the
  call that was wrong; a data operation that fails *after* it was posted is not an exception
  but a handle in state ``FAILED`` with ``handle.error`` set.
- ``ProtocolError``: bytes received on the control channel are not a valid control message.
  ``decode()`` raises only this family, whatever the input, so a receiver can catch one type,
  log it and drop the message without touching any session's memory.

Errors carry their data as attributes; messages say what to do.
"""

from __future__ import annotations

__all__ = [
    "BadEncodingError",
    "BadMagicError",
    "ControlMessageTooLargeError",
    "CrossMemoryError",
    "DescriptorError",
    "FieldRangeError",
    "InvalidBufferError",
    "InvalidTagError",
    "PeerUnknownError",
    "ProtocolError",
    "RegionsUnsupportedError",
    "TrailingBytesError",
    "TransportBootstrapError",
    "TransportClosedError",
    "TransportError",
    "TransportUnavailableError",
    "TruncatedMessageError",
    "UnknownKindError",
    "UnsupportedVersionError",
]


def _restore(cls: type[Exception], message: str, state: dict[str, object]) -> Exception:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class _Picklable(Exception):
    """Errors here take keyword data in ``__init__``; pickle them by message and attributes
    so they survive a trip between processes (multiprocessing, spawned test ranks)."""

    def __reduce__(self) -> tuple[object, ...]:
        return (_restore, (type(self), str(self), dict(self.__dict__)))


class TransportError(_Picklable):
    """Base class of the errors a transport raises synchronously."""


class TransportClosedError(TransportError):
    """An operation was asked of a transport after ``close()``."""

    def __init__(self, operation: str) -> None:
        self.operation = operation
        super().__init__(
            f"{operation} on a closed transport: create a new transport, or finish the "
            "work before close()"
        )


class RegionsUnsupportedError(TransportError):
    """A region send or receive was asked of a transport that moves contiguous buffers
    only (its ``moves_regions`` is false): gather the blocks into a buffer first."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        super().__init__(
            f"{transport} moves contiguous buffers only (moves_regions is False): gather the "
            "blocks into one buffer (kvhandoff.cuda_ext.gather) and use post_send/post_recv")


class PeerUnknownError(TransportError):
    """``peer`` is not a rank of this transport's group (or is this rank itself)."""

    def __init__(self, peer: object, rank: int, world_size: int) -> None:
        self.peer = peer
        self.rank = rank
        self.world_size = world_size
        super().__init__(
            f"peer {peer!r} is not another rank of this transport: valid peers are "
            f"0..{world_size - 1} except this rank ({rank})"
        )


class InvalidTagError(TransportError):
    """A data tag outside ``1..transport.max_tag`` (tag 0 is the control channel's)."""

    def __init__(self, tag: object, max_tag: int) -> None:
        self.tag = tag
        self.max_tag = max_tag
        super().__init__(
            f"data tag {tag!r} is out of range: use an int in 1..{max_tag} "
            "(0 is reserved for control messages)"
        )


class InvalidBufferError(TransportError):
    """A buffer this transport cannot move as bytes (not a tensor, not contiguous, on a
    device the transport cannot reach, or of a size that does not match its peer's)."""

    def __init__(self, reason: str, *, device: str | None = None) -> None:
        self.reason = reason
        self.device = device
        super().__init__(reason)


class ControlMessageTooLargeError(TransportError):
    """``send_control`` was given more bytes than a control frame holds."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"control message of {size} bytes exceeds the {limit}-byte limit: control "
            "messages carry handshakes, not data; move data with post_send/post_recv"
        )


class TransportUnavailableError(TransportError):
    """The backend a transport needs is not installed or not initialised."""

    def __init__(self, backend: str, hint: str) -> None:
        self.backend = backend
        self.hint = hint
        super().__init__(f"the {backend} transport is unavailable: {hint}")


class TransportBootstrapError(TransportError):
    """The ranks of a transport could not connect: a metadata exchange or rendezvous timed
    out, or a peer's metadata was not accepted. Nothing was posted."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"transport bootstrap failed: {reason}")


class CrossMemoryError(TransportError):
    """A cross-memory read (``process_vm_readv``) from process ``pid`` failed with ``errno``
    after ``done`` bytes: the peer died (``ESRCH``), its memory is gone (``EFAULT``) or this
    process may not read it (``EPERM``). Raised inside ``MPITransport``, which fails the
    receive's handle with this message (and tells the sender)."""

    def __init__(self, pid: int, errno: int, done: int) -> None:
        import errno as codes
        import os

        self.pid = pid
        self.errno = errno
        self.done = done
        name = codes.errorcode.get(errno, str(errno))
        super().__init__(
            f"cross-memory read from pid {pid} failed after {done} bytes: {name} "
            f"({os.strerror(errno)}); the peer exited or freed the memory, or ptrace is not "
            "permitted (same uid or CAP_SYS_PTRACE; pass use_cma=False to use MPI instead)")


class DescriptorError(_Picklable):
    """Bytes on a data tag that are not a valid cross-memory descriptor or ack (see
    ``kvhandoff.engine.transports._cma``). ``detail`` says what was wrong; ``data`` holds up
    to the first 64 bytes for logs. The receive fails; nothing is read or written."""

    def __init__(self, detail: str, data: bytes = b"") -> None:
        self.detail = detail
        self.data = bytes(data[:64])
        super().__init__(
            f"invalid cross-memory descriptor: {detail} (check that both sides run the same "
            "kvhandoff version)")


class ProtocolError(_Picklable):
    """Bytes that are not a valid control message. ``detail`` says what was wrong; ``data``
    holds up to the first 64 bytes of the offending input for logs."""

    def __init__(self, detail: str, data: bytes = b"") -> None:
        self.detail = detail
        self.data = bytes(data[:64])
        super().__init__(
            f"invalid control message: {detail} (the message was dropped; check that both "
            "sides run the same kvhandoff version)"
        )


class TruncatedMessageError(ProtocolError):
    """The input ended before the message did."""

    def __init__(self, needed: int, available: int, data: bytes = b"") -> None:
        self.needed = needed
        self.available = available
        super().__init__(f"truncated: needed {needed} bytes, got {available}", data)


class TrailingBytesError(ProtocolError):
    """The input continues after a complete message."""

    def __init__(self, extra: int, data: bytes = b"") -> None:
        self.extra = extra
        super().__init__(f"{extra} unexpected bytes after the message", data)


class BadMagicError(ProtocolError):
    """The input does not start with the kvhandoff control magic."""

    def __init__(self, magic: bytes, data: bytes = b"") -> None:
        self.magic = bytes(magic)
        super().__init__(f"bad magic {self.magic!r}: not a kvhandoff control message", data)


class UnsupportedVersionError(ProtocolError):
    """The message's format version is not one this side speaks."""

    def __init__(self, version: int, supported: int, data: bytes = b"") -> None:
        self.version = version
        self.supported = supported
        super().__init__(
            f"wire version {version} is not supported (this side speaks {supported}): "
            "upgrade the older side",
            data,
        )


class UnknownKindError(ProtocolError):
    """The message kind byte names no known message."""

    def __init__(self, kind: int, data: bytes = b"") -> None:
        self.kind = kind
        super().__init__(f"unknown message kind {kind}", data)


class FieldRangeError(ProtocolError):
    """A field is out of its range, or fields are inconsistent with each other (a block
    count above the limit, total bytes not a multiple of the block count, an empty or too
    long request id, an unknown reason code, ...). Raised by ``decode`` and also when a
    message object is constructed with such values."""

    def __init__(self, field: str, value: object, expected: str, data: bytes = b"") -> None:
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(f"field {field}={value!r} out of range: expected {expected}", data)


class BadEncodingError(ProtocolError):
    """A text field is not valid UTF-8."""

    def __init__(self, field: str, data: bytes = b"") -> None:
        self.field = field
        super().__init__(f"field {field} is not valid UTF-8", data)
