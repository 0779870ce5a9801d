"""kvhandoff.engine: the transfer engine and the paged KV memory it moves.

Where each part lives (docs/design.md has the whole picture): ``_engine.py`` the public
surface and the tick; ``_control.py`` the handshake and the peer's FAIL/CANCEL;
``_datapath.py`` posting, completions and wind-down; ``_agreement.py`` the TP group's
agreement (sans-I/O); ``_leases.py`` peer leases and heartbeats; ``_transfer.py`` the
per-request record; ``_wire.py`` the control-message format; ``pool.py`` the block pool;
``_staging.py`` staging buffers; ``transports/`` one module per transport.

Exports resolve lazily (PEP 562): ``import kvhandoff.engine`` does not import torch, so the
``kvhandoff`` command line starts fast; the first access to ``BlockPool`` imports it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvhandoff.engine.errors import (
    AdoptError,
    DataTagsExhaustedError,
    DoubleFreeError,
    EngineClosedError,
    EngineConfigError,
    EngineError,
    LayerReadyError,
    LayoutDecodeError,
    LayoutError,
    LayoutMismatchError,
    NotOwnerError,
    OutOfBlocksError,
    PinError,
    PoisonError,
    PoolConfigError,
    PoolError,
    PoolInvariantError,
    PoolModeError,
    TransferCancelled,
    TransferError,
    TransferFailed,
    TransferTimeout,
    UnknownBlockError,
)

if TYPE_CHECKING:
    from kvhandoff.engine._config import EngineConfig
    from kvhandoff.engine._engine import TransferEngine
    from kvhandoff.engine._handle import (
        DrainReport,
        EngineStats,
        TransferHandle,
        TransferRequest,
        TransferResult,
    )
    from kvhandoff.engine._wire import MAX_METADATA_BYTES
    from kvhandoff.engine.layout import MAX_LAYOUT_BYTES, KVLayout, LayoutDifference
    from kvhandoff.engine.pool import POISON_BLOCK_BYTE, BlockPool

# Public name -> the module that defines it, for the names that pull in torch.
_LAZY: dict[str, str] = {
    "BlockPool": "kvhandoff.engine.pool",
    "POISON_BLOCK_BYTE": "kvhandoff.engine.pool",
    "DrainReport": "kvhandoff.engine._handle",
    "EngineConfig": "kvhandoff.engine._config",
    "EngineStats": "kvhandoff.engine._handle",
    "KVLayout": "kvhandoff.engine.layout",
    "LayoutDifference": "kvhandoff.engine.layout",
    "MAX_LAYOUT_BYTES": "kvhandoff.engine.layout",
    "MAX_METADATA_BYTES": "kvhandoff.engine._wire",
    "TransferEngine": "kvhandoff.engine._engine",
    "TransferHandle": "kvhandoff.engine._handle",
    "TransferRequest": "kvhandoff.engine._handle",
    "TransferResult": "kvhandoff.engine._handle",
}

__all__ = [
    "MAX_LAYOUT_BYTES",
    "MAX_METADATA_BYTES",
    "POISON_BLOCK_BYTE",
    "AdoptError",
    "BlockPool",
    "DataTagsExhaustedError",
    "DoubleFreeError",
    "DrainReport",
    "EngineClosedError",
    "EngineConfig",
    "EngineConfigError",
    "EngineError",
    "EngineStats",
    "KVLayout",
    "LayerReadyError",
    "LayoutDecodeError",
    "LayoutDifference",
    "LayoutError",
    "LayoutMismatchError",
    "NotOwnerError",
    "OutOfBlocksError",
    "PinError",
    "PoisonError",
    "PoolConfigError",
    "PoolError",
    "PoolInvariantError",
    "PoolModeError",
    "TransferCancelled",
    "TransferEngine",
    "TransferError",
    "TransferFailed",
    "TransferHandle",
    "TransferRequest",
    "TransferResult",
    "TransferTimeout",
    "UnknownBlockError",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
