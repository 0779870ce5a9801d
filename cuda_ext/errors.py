"""Every exception (and the one warning) raised by ``kvhandoff.cuda_ext``.

They live in one module so that every backend (the compiled C++/CUDA extension and the torch
fallback) raises the very same types: a caller never has to know which backend ran. Each
carries its data as attributes; the message says what the caller should do.

All validation errors are raised before a single byte is copied.
"""

from __future__ import annotations

from typing import Any


def _preview(ids: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}]"


class BlockCopyError(Exception):
    """Base class of every error raised by ``kvhandoff.cuda_ext``."""


class LayerMismatchError(BlockCopyError, ValueError):
    """A layer tensor does not match the first one (or the layer list itself is unusable).

    Attributes: ``index`` (position in ``layers``, None for the list as a whole), ``field``
    (``"count"``, ``"type"``, ``"dtype"``, ``"device"`` or ``"shape"``), ``expected`` and
    ``got``.
    """

    def __init__(self, index: int | None, field: str, expected: Any, got: Any):
        self.index = index
        self.field = field
        self.expected = expected
        self.got = got
        if field == "count":
            message = "layers is empty: pass at least one [num_blocks, *block_shape] tensor"
        elif index is None or index == 0:
            message = f"layers[0] has {field} {got}; expected {expected}"
        else:
            message = (
                f"layers[{index}] has {field} {got} but layers[0] has {expected}; every layer "
                "tensor must have the same dtype, device and shape [num_blocks, *block_shape]"
            )
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.index, self.field, self.expected, self.got))


class NonContiguousLayerError(BlockCopyError, ValueError):
    """A layer tensor is not contiguous, so its blocks are not plain byte ranges.

    Attributes: ``index``, ``shape`` and ``stride`` (tuples of int).
    """

    def __init__(self, index: int, shape: tuple[int, ...], stride: tuple[int, ...]):
        self.index = index
        self.shape = shape
        self.stride = stride
        super().__init__(
            f"layers[{index}] (shape {list(shape)}, stride {list(stride)}) is not contiguous; "
            "pass the pool's own tensors or call .contiguous() on them (a copy would not "
            "receive a scatter)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.index, self.shape, self.stride))


class InvalidBlockIdsError(BlockCopyError, TypeError):
    """``block_ids`` is neither a sequence of ints nor a 1-D integer tensor on the CPU.

    Attribute: ``got`` (a short description of what was passed).
    """

    def __init__(self, got: str):
        self.got = got
        super().__init__(
            f"block_ids must be a sequence of ints or a 1-D integer CPU tensor, got {got}; "
            "block tables live on the CPU (the CUDA path copies them to the GPU itself)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.got,))


class BlockIdOutOfRangeError(BlockCopyError, IndexError):
    """Some block ids are negative or not below the pool's ``num_blocks``.

    Attributes: ``block_ids`` (every offending id, in call order) and ``num_blocks``.
    """

    def __init__(self, block_ids: list[int], num_blocks: int):
        self.block_ids = block_ids
        self.num_blocks = num_blocks
        super().__init__(
            f"block ids {_preview(block_ids)} are out of range for a pool of {num_blocks} "
            f"blocks; valid ids are 0..{num_blocks - 1} (negative ids are not wrapped)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.block_ids, self.num_blocks))


class DuplicateBlockIdError(BlockCopyError, ValueError):
    """A scatter (or copy_blocks) names the same destination block more than once, so the
    result would depend on which copy landed last.

    Attribute: ``block_ids`` (each duplicated id once, ascending).
    """

    def __init__(self, block_ids: list[int]):
        self.block_ids = block_ids
        super().__init__(
            f"destination block ids {_preview(block_ids)} appear more than once; each "
            "destination block may be written by one packed block only"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.block_ids,))


class PackedBufferError(BlockCopyError, ValueError):
    """The packed buffer (``out`` of gather, ``buf`` of scatter) is not a contiguous 1-D uint8
    tensor on the layers' device.

    Attributes: ``field`` (``"type"``, ``"dtype"``, ``"dim"``, ``"contiguous"`` or ``"device"``),
    ``expected`` and ``got``.
    """

    def __init__(self, field: str, expected: Any, got: Any):
        self.field = field
        self.expected = expected
        self.got = got
        super().__init__(
            f"the packed buffer has {field} {got}, expected {expected}; allocate it with "
            "torch.empty(packed_nbytes(layers, len(block_ids)), dtype=torch.uint8, "
            "device=layers[0].device)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.field, self.expected, self.got))


class BufferSizeError(BlockCopyError, ValueError):
    """The packed buffer does not hold exactly the bytes the chosen blocks of every layer
    take: a shorter one cannot hold them, and a longer one would leave (gather) or read
    (scatter) bytes no block accounts for, which is always a caller's sizing bug.

    Attributes: ``needed_nbytes`` and ``got_nbytes``.
    """

    def __init__(self, needed_nbytes: int, got_nbytes: int):
        self.needed_nbytes = needed_nbytes
        self.got_nbytes = got_nbytes
        super().__init__(
            f"the packed buffer has {got_nbytes} bytes but exactly {needed_nbytes} are needed; "
            "size it with packed_nbytes(layers, len(block_ids)) (slice a larger one)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.needed_nbytes, self.got_nbytes))


class BlockCopySidesError(BlockCopyError, ValueError):
    """The source and destination of a block-to-block copy (``copy_blocks``) do not describe
    the same bytes: another number of layer tensors, block shape, dtype, device or number of
    block ids.

    Attributes: ``field`` (``"count"``, ``"block_shape"``, ``"dtype"``, ``"device"`` or
    ``"num_ids"``), ``source`` and ``destination`` (the two sides' values).
    """

    def __init__(self, field: str, source: Any, destination: Any):
        self.field = field
        self.source = source
        self.destination = destination
        super().__init__(
            f"copy_blocks: the source has {field} {source} but the destination {destination}; "
            "both sides must hold the same layers (count, block shape, dtype, device) and name "
            "as many blocks"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.field, self.source, self.destination))


class InvalidRegionsError(BlockCopyError, ValueError):
    """One side of ``copy_regions`` is not a usable region list: its addresses and lengths
    are not two 1-D ``uint64`` arrays of one length, its device is not a ``torch.device``, or
    a region lies outside every tensor in its ``owners`` (the copy would touch memory nobody
    keeps alive).

    Attributes: ``side`` (``"source"`` or ``"destination"``) and ``reason``.
    """

    def __init__(self, side: str, reason: str):
        self.side = side
        self.reason = reason
        super().__init__(
            f"copy_regions: the {side} regions are unusable: {reason}; build them with "
            "kvhandoff.engine.transports.block_regions"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.side, self.reason))


class RegionSizeMismatchError(BlockCopyError, ValueError):
    """The two region lists of ``copy_regions`` hold different numbers of bytes, so the
    source stream cannot fill the destination exactly.

    Attributes: ``source_nbytes`` and ``destination_nbytes``.
    """

    def __init__(self, source_nbytes: int, destination_nbytes: int):
        self.source_nbytes = source_nbytes
        self.destination_nbytes = destination_nbytes
        super().__init__(
            f"copy_regions: the source regions hold {source_nbytes} bytes and the destination "
            f"regions {destination_nbytes}; a copy moves one exact byte stream"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.source_nbytes, self.destination_nbytes))


class OverlappingCopyError(BlockCopyError, ValueError):
    """A block-to-block or region copy would write bytes it also reads (source and
    destination overlap in memory), so the result would depend on the copy order.

    Attributes: ``address`` (the first overlapping source byte) and ``nbytes`` (how many
    bytes of that source range overlap the destination).
    """

    def __init__(self, address: int, nbytes: int):
        self.address = address
        self.nbytes = nbytes
        super().__init__(
            f"the source and destination of the copy overlap at {address:#x} ({nbytes} bytes); "
            "copy between distinct blocks (stage through a buffer to move a block onto itself)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.address, self.nbytes))


class ExtensionUnavailableError(BlockCopyError, RuntimeError):
    """``KVHANDOFF_BLOCK_COPY=cpp`` asked for the compiled extension and it cannot be used.

    Attribute: ``reason`` (why the build or load failed, or which device it lacks).
    """

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(
            f"the compiled block copy extension is unavailable: {reason}. Fix the cause, or "
            "unset KVHANDOFF_BLOCK_COPY (auto falls back to torch) or set it to 'torch'"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason,))


class BlockCopyConfigError(BlockCopyError, ValueError):
    """An environment variable of this package has a value it does not understand.

    Attributes: ``variable``, ``value`` and ``allowed`` (tuple of accepted values).
    """

    def __init__(self, variable: str, value: str, allowed: tuple[str, ...]):
        self.variable = variable
        self.value = value
        self.allowed = allowed
        super().__init__(
            f"{variable}={value!r} is not understood; use one of {', '.join(allowed)}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.variable, self.value, self.allowed))


class BlockCopyFallbackWarning(RuntimeWarning):
    """Issued once per process when block copies fall back to the pure-torch implementation
    because the compiled extension could not be built or loaded; the text says how to fix it."""
