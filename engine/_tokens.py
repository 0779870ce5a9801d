"""The token slots of a transfer: only the valid tokens of its last block move.

Theory of operation. A transfer of ``n`` blocks that carries ``num_tokens`` tokens fills
every slot of its first ``n - 1`` blocks and ``valid = num_tokens - (n - 1) * block_tokens``
(1..``block_tokens``) slots of its last one; the rest of that block is not the request's, and
the receiver's bytes there are left as they are. So the byte stream of a chunk is its
tensors' blocks packed tensor-major in block-id order (``cuda_ext.gather``'s layout) except
that each tensor's last block contributes only its valid slots, the ``BlockTail`` of the
pool's layout (``KVLayout``):

* ``NHD`` blocks (``[block_tokens, kv_heads, head_dim]``): the first ``valid`` token rows,
  one prefix of the block;
* ``HND`` blocks (``[kv_heads, block_tokens, head_dim]``): the first ``valid`` rows of each
  head, ``kv_heads`` ranges of ``valid * head_dim`` elements, ``block_tokens * head_dim``
  apart.

A count that fills the last block (the default, every slot) has no tail: whole blocks move,
the same bytes in the same pieces through the same kernels as before counts existed. A pool
whose layer tensors are not ``[num_blocks, *layout.block_shape]`` would not say where a
token's bytes are; it keeps whole blocks too (every pool ``BlockPool`` builds or adopts has
that shape: its layout is checked against the tensors).

One definition of the stream, three users. The region path moves ``block_regions(...,
tail)`` itself; the staged path's ``gather`` / ``scatter`` of a piece use the block kernels
for a piece of whole blocks, and for the piece that holds the last block (only that one has
the tail) the region copy (``cuda_ext.copy_regions``) between the same regions and the
staging bytes, one pass like the kernels, on every device they support; the checksum of a
region side gathers its pieces the same way. Both sides derive the tail from the count,
which the advertise validates, and the layout, which must be equal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from kvhandoff import cuda_ext
from kvhandoff.engine.layout import KVLayout
from kvhandoff.engine.transports._regions import BlockTail, block_regions, buffer_regions

__all__ = ["TokenSlots", "gather", "packed_nbytes", "scatter"]


class TokenSlots:
    """Where a pool's token slots are in a block of one of its layer tensors (all alike)."""

    def __init__(self, layout: KVLayout, layers: Sequence[torch.Tensor]) -> None:
        first = layers[0]
        element = first.element_size()
        self.block_tokens = layout.block_tokens
        #: Bytes of one block of one layer tensor.
        self.tensor_block_nbytes = math.prod(first.shape[1:]) * element
        self._known = tuple(first.shape[1:]) == layout.block_shape
        # HND with one head is NHD's geometry: one prefix per block.
        self._head_major = layout.order == "HND" and layout.kv_heads > 1
        self._kv_heads = layout.kv_heads
        row = layout.head_dim * element
        # Bytes of one token slot in one range: a whole token row (NHD), one head's (HND);
        # the heads' ranges (HND) start a head's block_tokens rows apart.
        self._slot_nbytes = row if self._head_major else layout.kv_heads * row
        self._head_stride = layout.block_tokens * row

    def tail(self, num_tokens: int, blocks: int) -> BlockTail | None:
        """What moves of each tensor's last block for ``num_tokens`` tokens in ``blocks``
        blocks; None when that is the whole block (the count fills it, or is not known)."""
        valid = num_tokens - (blocks - 1) * self.block_tokens
        if not self._known or not 0 < valid < self.block_tokens:
            return None
        if self._head_major:
            return BlockTail(self._kv_heads, valid * self._slot_nbytes, self._head_stride)
        return BlockTail(1, valid * self._slot_nbytes)

    def left_out(self, num_tokens: int, blocks: int) -> int:
        """Bytes of each tensor's last block that do not move (0: the whole block does)."""
        tail = self.tail(num_tokens, blocks)
        return 0 if tail is None else self.tensor_block_nbytes - tail.total

    def chunk_nbytes(self, blocks: int, num_tokens: int, tensors: int) -> int:
        """Bytes a chunk of ``tensors`` layer tensors moves for the transfer."""
        return tensors * (blocks * self.tensor_block_nbytes - self.left_out(num_tokens, blocks))


def packed_nbytes(layers: Sequence[torch.Tensor], blocks: int, tail: BlockTail | None) -> int:
    """Bytes ``gather`` packs for ``blocks`` blocks of ``layers`` with ``tail``."""
    whole = cuda_ext.packed_nbytes(list(layers), blocks)
    if tail is None:
        return whole
    return whole - len(layers) * (whole // (len(layers) * blocks) - tail.total)


def gather(layers: Sequence[torch.Tensor], block_ids: Sequence[int], out: torch.Tensor,
           tail: BlockTail | None) -> None:
    """Pack blocks ``block_ids`` of ``layers`` into ``out`` (exactly ``packed_nbytes``), the
    last block of each tensor cut to ``tail``; the errors of ``cuda_ext.gather`` /
    ``copy_regions`` (a buffer of another size among them), raised before any byte moves."""
    if tail is None:
        cuda_ext.gather(list(layers), block_ids, out)
    else:
        cuda_ext.copy_regions(block_regions(layers, block_ids, tail), buffer_regions(out))


def scatter(buf: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: Sequence[int],
            tail: BlockTail | None) -> None:
    """Inverse of ``gather``: the bytes of the last block's slots past the tail are left
    untouched."""
    if tail is None:
        cuda_ext.scatter(buf, list(layers), block_ids)
    else:
        cuda_ext.copy_regions(buffer_regions(buf), block_regions(layers, block_ids, tail))
