"""Transports: move the bytes of a buffer between ranks, observed without blocking.

One small interface (``Transport``, ``TransportHandle``; see ``_base``) and one module per
backend. Backends import their libraries (mpi4py, torch.distributed) only when a transport
is created, so importing this package never needs MPI.
"""

from __future__ import annotations

from kvhandoff.engine.transports._base import (
    CONTROL_TAG,
    MAX_CONTROL_BYTES,
    HandleKind,
    HandleState,
    Transport,
    TransportHandle,
    WrappingTransport,
)
from kvhandoff.engine.transports._faulty import Fault, FaultyTransport
from kvhandoff.engine.transports._loopback import LoopbackTransport, loopback_group
from kvhandoff.engine.transports._mpi import MPITransport
from kvhandoff.engine.transports._nixl import NixlTransport
from kvhandoff.engine.transports._regions import BlockTail, Regions, block_regions, buffer_regions
from kvhandoff.engine.transports._torchdist import TorchDistTransport
from kvhandoff.engine.transports.errors import (
    ControlMessageTooLargeError,
    InvalidBufferError,
    InvalidTagError,
    PeerUnknownError,
    RegionsUnsupportedError,
    TransportBootstrapError,
    TransportClosedError,
    TransportError,
    TransportUnavailableError,
)

__all__ = [
    "CONTROL_TAG",
    "MAX_CONTROL_BYTES",
    "BlockTail",
    "ControlMessageTooLargeError",
    "Fault",
    "FaultyTransport",
    "HandleKind",
    "HandleState",
    "InvalidBufferError",
    "InvalidTagError",
    "LoopbackTransport",
    "MPITransport",
    "NixlTransport",
    "PeerUnknownError",
    "Regions",
    "RegionsUnsupportedError",
    "TorchDistTransport",
    "Transport",
    "TransportBootstrapError",
    "TransportClosedError",
    "TransportError",
    "TransportHandle",
    "TransportUnavailableError",
    "WrappingTransport",
    "block_regions",
    "buffer_regions",
    "loopback_group",
]
