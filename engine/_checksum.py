"""The optional end-to-end checksum of a transfer's bytes (``EngineConfig.checksum``).

Theory of operation. The checksum names the bytes a transfer moves *in wire order*: chunk
``i`` is the bytes of layer group ``i`` gathered for the transfer's block ids (one chunk for
the whole request, or one per layer for a layer-wise one), exactly what a staging buffer
holds. Each chunk gets a CRC-32 (``zlib.crc32``: cheap, in C, enough to catch torn, stale or
misdirected bytes; not a defence against an adversary) and the transfer's checksum is the
CRC-32 of the chunks' CRCs in chunk order, so chunks may be checksummed in whatever order
they are produced (layer-wise sends post layers as the model writes them).

Two ways in, one answer: the staged path feeds each piece to ``piece_crc`` as it is
gathered (sender) or lands (receiver, before its window slot is reused), ``staged_checksum``
reads a whole staging buffer, and ``blocks_checksum`` gathers the same bytes from the pool's
layer tensors, piece by piece as the operations carry them, for the region path (which
moves blocks without staging); of the last block, only its valid token slots are in the
bytes, on either path (``_tokens``). ``DataPath.checksum`` picks the one for a transfer's
path, so each side may take either path and the two checksums still agree. ``checksum_of_chunks``
combines per-chunk CRCs made by either. Device tensors are copied to the host to be read:
the checksum is off on the hot path by default for that reason.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import torch
from kvhandoff.engine import _tokens
from kvhandoff.engine.transports import BlockTail

__all__ = ["blocks_checksum", "checksum_of_chunks", "chunk_crc", "piece_crc", "staged_checksum"]


def _host_bytes(buf: torch.Tensor) -> memoryview:
    flat = buf.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return flat.contiguous().view(torch.uint8).numpy().data


def chunk_crc(buf: torch.Tensor) -> int:
    """CRC-32 of one chunk's bytes (any dtype, any device; read as contiguous bytes)."""
    return zlib.crc32(_host_bytes(buf))


def piece_crc(buf: torch.Tensor, crc: int) -> int:
    """``crc`` (a chunk's CRC-32 so far) fed the bytes of its next piece: a chunk checksummed
    piece by piece, in order, has the CRC of its bytes as one buffer."""
    return zlib.crc32(_host_bytes(buf), crc)


def checksum_of_chunks(crcs: Sequence[int]) -> int:
    """The transfer's checksum from its chunks' CRCs, given in chunk order."""
    if len(crcs) == 1:
        return crcs[0]
    return zlib.crc32(struct.pack(f"!{len(crcs)}I", *crcs))


def staged_checksum(staging: torch.Tensor, num_chunks: int) -> int:
    """The checksum of a staging buffer holding ``num_chunks`` equal chunks."""
    size = staging.numel() // num_chunks
    return checksum_of_chunks(
        [chunk_crc(staging[i * size:(i + 1) * size]) for i in range(num_chunks)])


def blocks_checksum(layer_groups: Sequence[Sequence[torch.Tensor]],
                    pieces: Sequence[Sequence[int]], tail: BlockTail | None = None) -> int:
    """The checksum of blocks read from the pool: ``layer_groups[i]`` are the layer tensors
    of chunk ``i`` (every layer for a whole-request transfer, a layer's K and V for a
    layer-wise one) and ``pieces`` the block ids of each operation of a chunk, in order (one
    piece: the transfer's ids); ``tail`` is what moves of the last block (the last piece's:
    see ``_tokens``). Each piece is gathered as its operation carries it, so this equals
    ``staged_checksum`` of the staging buffer of the same transfer."""
    crcs = []
    last = len(pieces) - 1
    for layers in layer_groups:
        crc = 0
        for index, ids in enumerate(pieces):
            cut = tail if index == last else None
            buf = torch.empty(_tokens.packed_nbytes(layers, len(ids), cut),
                              dtype=torch.uint8, device=layers[0].device)
            _tokens.gather(layers, ids, buf, cut)
            crc = zlib.crc32(_host_bytes(buf), crc)
        crcs.append(crc)
    return checksum_of_chunks(crcs)
