"""Reused staging buffers for packed transfers.

A transfer gathers its blocks into one contiguous byte buffer and moves that buffer as one
operation. Allocating a fresh buffer per transfer costs a page-faulting allocation of the same
size as the data; instead buffers are kept in power-of-two size classes and handed out again.

A buffer is returned only when its transfer is quiescent (the transport can no longer touch
it), the same rule as for KV blocks: a quarantined transfer keeps its staging buffer out of
circulation until its handle reaches a final state.

A staged transfer asks for at most ``EngineConfig.staging_window`` pieces (its window of
slots, see ``_transfer``), so what is outstanding is bounded by the window times the open
transfers, not by their sizes; ``outstanding_nbytes`` and ``peak_nbytes`` say how much.
"""

from __future__ import annotations

import attrs
import torch

_MIN_CLASS_BYTES = 1 << 12  # 4 KiB: smaller requests share the smallest class


def _size_class(nbytes: int) -> int:
    return max(_MIN_CLASS_BYTES, 1 << (max(nbytes, 1) - 1).bit_length())


# No on-setattr hooks: the converter of ``device`` would otherwise run attrs' validate and
# convert pipeline on every counter update, twice per transfer.
@attrs.define(on_setattr=attrs.setters.NO_OP)
class StagingPool:
    """Free lists of uint8 buffers by size class, bounded by ``max_cached_bytes``.

    ``acquire(n)`` returns a 1-D uint8 view of exactly ``n`` bytes whose storage is at least
    that large; ``release(view)`` gives its storage back. Buffers beyond the cache bound are
    dropped (freed by the allocator) rather than kept.
    """

    device: torch.device = attrs.field(converter=torch.device, default=torch.device("cpu"))
    max_cached_bytes: int = 1 << 30
    pin_memory: bool = False
    _free: dict[int, list[torch.Tensor]] = attrs.field(factory=dict, init=False)
    _cached_bytes: int = attrs.field(default=0, init=False)
    _outstanding: dict[int, torch.Tensor] = attrs.field(factory=dict, init=False)
    allocations: int = attrs.field(default=0, init=False)
    reuses: int = attrs.field(default=0, init=False)
    #: Bytes handed out and not yet released (as asked for), and the most there ever were.
    outstanding_nbytes: int = attrs.field(default=0, init=False)
    peak_nbytes: int = attrs.field(default=0, init=False)

    def acquire(self, nbytes: int) -> torch.Tensor:
        if nbytes < 0:
            raise ValueError(f"staging size must be >= 0, got {nbytes}")
        size = _size_class(nbytes)
        bucket = self._free.get(size)
        if bucket:
            base = bucket.pop()
            self._cached_bytes -= size
            self.reuses += 1
        else:
            base = torch.empty(
                size,
                dtype=torch.uint8,
                device=self.device,
                pin_memory=self.pin_memory and self.device.type == "cpu",
            )
            self.allocations += 1
        view = base if nbytes == size else base[:nbytes]  # a slice costs more than the rest
        self._outstanding[id(view)] = base
        self.outstanding_nbytes += nbytes
        self.peak_nbytes = max(self.peak_nbytes, self.outstanding_nbytes)
        return view

    def release(self, view: torch.Tensor) -> None:
        base = self._outstanding.pop(id(view), None)
        if base is None:
            raise ValueError("release() of a buffer this StagingPool did not hand out")
        self.outstanding_nbytes -= view.numel()
        size = base.numel()
        if self._cached_bytes + size <= self.max_cached_bytes:
            self._free.setdefault(size, []).append(base)
            self._cached_bytes += size

    @property
    def outstanding(self) -> int:
        """Buffers handed out and not yet released (held by live or quarantined transfers)."""
        return len(self._outstanding)
