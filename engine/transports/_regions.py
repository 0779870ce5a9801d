"""``Regions``: a message made of byte ranges of memory the caller owns (the region form).

A staged transfer gathers a request's blocks into one contiguous buffer and moves that. A
transport that can address scattered memory itself (MPI derived datatypes, NIXL descriptor
lists, a block-to-block copy) moves the blocks where they are instead: the message is the
concatenation, in order, of the bytes of each region. The order is the packed layout of
``kvhandoff.cuda_ext.gather`` (tensor-major: every chosen block of the first tensor in block-id
order, then the next tensor's), so a region send and a staged receive of the same blocks, or
the other way round, carry the same byte stream: each side chooses its path alone.

``block_regions(tensors, block_ids)`` builds the regions of a block table; runs of consecutive
block ids whose blocks are adjacent in memory collapse into one region. ``Regions`` keeps the
tensors it points into alive, and holds addresses and lengths as two ``uint64`` numpy arrays
(descriptor lists for NIXL, displacements for an MPI ``hindexed`` type) built without a Python
step per block.

A partial last block. A request's last block is usually only partly filled: with ``tail`` (a
``BlockTail``), the last block of each tensor contributes only those bytes, ``runs`` ranges of
``nbytes`` each, ``stride`` apart from the block's start (the token slots that hold tokens:
one prefix of an ``NHD`` block, one range per head of an ``HND`` one; the engine derives the
tail from the transfer's token count). The byte stream stays tensor-major: each tensor's
whole blocks, then its tail. ``buffer_regions(buf)`` is a contiguous buffer as one region,
for a copy between a buffer and regions (``cuda_ext.copy_regions``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import numpy as np
import torch
from kvhandoff.engine.transports.errors import InvalidBufferError

__all__ = ["BlockTail", "Regions", "block_regions", "buffer_regions", "common_cut"]


@attrs.frozen(eq=False)
class Regions:
    """Ordered byte regions ``(addresses[i], lengths[i])`` on one ``device``; ``nbytes`` is
    their sum. ``owners`` are the tensors the regions lie in (kept alive while a transport
    holds the regions). Build one with ``block_regions``; the fields are not re-validated."""

    addresses: np.ndarray
    lengths: np.ndarray
    device: torch.device
    owners: tuple[torch.Tensor, ...]
    nbytes: int

    def __len__(self) -> int:
        return len(self.addresses)

    def split(self, parts: int) -> list[Regions]:
        """The regions as ``parts`` consecutive pieces of equal ``nbytes`` (a region that
        straddles a boundary is cut); ``nbytes`` must be a multiple of ``parts``. Used to
        move one message as several operations."""
        if type(parts) is not int or parts < 1 or self.nbytes % parts:
            raise ValueError(f"cannot split {self.nbytes} bytes into {parts!r} equal parts")
        if parts == 1:
            return [self]
        size = self.nbytes // parts
        ends = np.cumsum(self.lengths, dtype=np.uint64)
        starts = ends - self.lengths
        out = []
        for k in range(parts):
            lo, hi = k * size, (k + 1) * size
            first = int(np.searchsorted(ends, lo, side="right"))
            last = int(np.searchsorted(starts, hi, side="left"))
            addr = self.addresses[first:last].copy()
            length = self.lengths[first:last].copy()
            head_cut = lo - int(starts[first])
            addr[0] += np.uint64(head_cut)
            length[0] -= np.uint64(head_cut)
            length[-1] -= np.uint64(int(ends[last - 1]) - hi)
            out.append(Regions(addr, length, self.device, self.owners, size))
        return out


@attrs.frozen
class BlockTail:
    """The bytes of a block that move when only part of it does: ``runs`` ranges of
    ``nbytes`` bytes, the first at the block's start and each next one ``stride`` bytes
    after the one before (``stride`` matters only for ``runs > 1``). Checked against the
    tensors' blocks by ``block_regions``."""

    runs: int
    nbytes: int
    stride: int = 0

    @property
    def total(self) -> int:
        """Bytes the tail moves of one block."""
        return self.runs * self.nbytes

    def check(self, block_nbytes: int) -> None:
        """``InvalidBufferError`` unless the ranges lie in a block of ``block_nbytes`` bytes,
        in order and apart."""
        fields = (self.runs, self.nbytes, self.stride)
        if any(isinstance(f, bool) or not isinstance(f, int) for f in fields) \
                or self.runs < 1 or self.nbytes < 1 \
                or (self.runs > 1 and self.stride < self.nbytes) \
                or (self.runs - 1) * self.stride + self.nbytes > block_nbytes:
            raise InvalidBufferError(
                f"a block tail of {self.runs} ranges of {self.nbytes} bytes, {self.stride} "
                f"apart, does not fit in order in a block of {block_nbytes} bytes")


def buffer_regions(buf: torch.Tensor) -> Regions:
    """A contiguous tensor as one region over its bytes."""
    if not isinstance(buf, torch.Tensor) or not buf.is_contiguous():
        raise InvalidBufferError("buffer_regions needs a contiguous torch.Tensor")
    nbytes = buf.numel() * buf.element_size()
    return Regions(np.array([buf.data_ptr()], dtype=np.uint64),
                   np.array([nbytes], dtype=np.uint64), buf.device, (buf,), nbytes)


def _block_geometry(tensor: torch.Tensor) -> tuple[int, int, int]:
    """``(num_blocks, block bytes, block stride in bytes)`` of a ``[num_blocks, ...]`` tensor
    whose every block is contiguous; ``InvalidBufferError`` otherwise."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2:
        raise InvalidBufferError(
            f"a block tensor must be a torch.Tensor of shape [num_blocks, ...], got "
            f"{type(tensor).__name__}"
            + (f" of shape {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else ""))
    if not tensor[0].is_contiguous():
        raise InvalidBufferError(
            "every block of a block tensor must be contiguous in memory (its dimensions after "
            f"the first), got strides {tensor.stride()} for shape {tuple(tensor.shape)}",
            device=str(tensor.device))
    element = tensor.element_size()
    block_nbytes = math.prod(tensor.shape[1:]) * element
    return tensor.shape[0], block_nbytes, tensor.stride(0) * element


def block_regions(tensors: Sequence[torch.Tensor], block_ids: Sequence[int] | np.ndarray,
                  tail: BlockTail | None = None) -> Regions:
    """The regions of blocks ``block_ids`` of every tensor in ``tensors`` (each
    ``[num_blocks, ...]``, one device, every block contiguous), in packed order; with
    ``tail``, the last block of each tensor contributes only the tail's ranges (see the
    module docstring). Raises ``InvalidBufferError`` for tensors of another form,
    out-of-range ids or a tail that does not fit a block, before anything else. Ids are not
    checked for duplicates (a send may read a block twice; the engine validates a receive's
    ids)."""
    tensors = tuple(tensors)
    if not tensors:
        raise InvalidBufferError("block_regions needs at least one tensor")
    ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise InvalidBufferError("block_regions needs at least one block id")
    device = tensors[0].device
    geometry = [_block_geometry(t) for t in tensors]
    for tensor in tensors:
        if tensor.device != device:
            raise InvalidBufferError(
                f"every block tensor must be on one device: {device} and {tensor.device}")
    if tail is not None:
        if not isinstance(tail, BlockTail):
            raise InvalidBufferError(f"tail must be a BlockTail, not {type(tail).__name__}")
        for block_nbytes in {g[1] for g in geometry}:  # a pool's tensors share one size
            tail.check(block_nbytes)
    low, high = int(ids.min()), int(ids.max())
    limit = min(g[0] for g in geometry)
    if low < 0 or high >= limit:
        raise InvalidBufferError(f"block id {low if low < 0 else high} is out of range "
                                 f"0..{limit - 1}", device=str(device))
    # Runs of consecutive ids: a run starts where the id is not the previous one plus one.
    starts = np.flatnonzero(np.diff(ids, prepend=ids[0] - 2) != 1)
    run_first = ids[starts].astype(np.uint64)
    run_len = np.diff(np.append(starts, ids.size)).astype(np.uint64)
    bases = np.array([t.data_ptr() for t in tensors], dtype=np.uint64)
    # With a tail, each tensor's last block leaves out what its tail does not move.
    total = sum(ids.size * g[1] - (0 if tail is None else g[1] - tail.total) for g in geometry)
    if len({g[1:] for g in geometry}) == 1:  # one block size and stride: one pass for all
        _, block_nbytes, stride = geometry[0]
        if stride == block_nbytes:  # adjacent blocks: one region per run
            offsets, lengths = run_first * np.uint64(stride), run_len * np.uint64(stride)
        else:  # blocks apart in memory (K and V interleaved per block): one per block
            offsets = ids.astype(np.uint64) * np.uint64(stride)
            lengths = np.full(ids.size, block_nbytes, dtype=np.uint64)
        if tail is not None:
            # The last region ends with the last block (alone, or closing its run): cut it
            # to the tail's first range, and add the others after it.
            lengths[-1] -= np.uint64(block_nbytes - tail.nbytes)
            if tail.runs > 1:
                last = np.uint64(int(ids[-1]) * stride)
                more = last + np.arange(1, tail.runs, dtype=np.uint64) * np.uint64(tail.stride)
                offsets = np.concatenate([offsets, more])
                lengths = np.concatenate(
                    [lengths, np.full(tail.runs - 1, tail.nbytes, dtype=np.uint64)])
        addresses = np.add.outer(bases, offsets).ravel()
        return Regions(addresses, np.tile(lengths, len(tensors)), device, tensors, total)
    parts = [block_regions([t], ids, tail) for t in tensors]
    return Regions(np.concatenate([p.addresses for p in parts]),
                   np.concatenate([p.lengths for p in parts]), device, tensors, total)


def common_cut(a_addresses: np.ndarray, a_lengths: np.ndarray, b_addresses: np.ndarray,
               b_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two region lists of one byte stream (the same total length) cut at the union of
    their boundaries: ``(a addresses, b addresses, lengths)`` as ``uint64`` arrays, piece
    ``i`` of one length on both sides, in stream order, so each piece is one copy between
    the two (a cross-memory read's iovecs, a NIXL descriptor pair). Vectorised (no Python
    step per piece). Lists of equal lengths come back as they are: the results may be the
    caller's own arrays (or views of them), so copy before changing them in place."""
    a_addresses = a_addresses.astype(np.uint64, copy=False)
    b_addresses = b_addresses.astype(np.uint64, copy=False)
    a_lengths = a_lengths.astype(np.uint64, copy=False)
    b_lengths = b_lengths.astype(np.uint64, copy=False)
    if len(a_lengths) == len(b_lengths) and np.array_equal(a_lengths, b_lengths):
        return a_addresses, b_addresses, a_lengths  # one cut already
    a_ends = np.cumsum(a_lengths, dtype=np.uint64)
    b_ends = np.cumsum(b_lengths, dtype=np.uint64)
    ends = np.union1d(a_ends, b_ends)  # both increasing: sorted, no repeats
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1]
    ai = np.searchsorted(a_ends, starts, side="right")
    bi = np.searchsorted(b_ends, starts, side="right")
    a = a_addresses[ai] + (starts - (a_ends[ai] - a_lengths[ai]))
    b = b_addresses[bi] + (starts - (b_ends[bi] - b_lengths[bi]))
    return a, b, ends - starts
