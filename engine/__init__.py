"""kvhandoff.engine: the transfer engine and the paged KV memory it moves.

Exports resolve lazily (PEP 562): ``import kvhandoff.engine`` does not import torch, so the
``kvhandoff`` command line starts fast; the first access to ``BlockPool`` imports it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvhandoff.engine.errors import (
    DoubleFreeError,
    EngineClosedError,
    EngineConfigError,
    EngineError,
    LayerReadyError,
    NotOwnerError,
    OutOfBlocksError,
    PinError,
    PoisonError,
    PoolConfigError,
    PoolError,
    PoolInvariantError,
    TransferCancelled,
    TransferError,
    TransferFailed,
    TransferTimeout,
    UnknownBlockError,
)

if TYPE_CHECKING:
    from kvhandoff.engine._engine import (
        DrainReport,
        EngineConfig,
        EngineStats,
        TransferEngine,
        TransferHandle,
        TransferResult,
    )
    from kvhandoff.engine.pool import POISON_BLOCK_BYTE, BlockPool

# Public name -> the module that defines it, for the names that pull in torch.
_LAZY: dict[str, str] = {
    "BlockPool": "kvhandoff.engine.pool",
    "POISON_BLOCK_BYTE": "kvhandoff.engine.pool",
    "DrainReport": "kvhandoff.engine._engine",
    "EngineConfig": "kvhandoff.engine._engine",
    "EngineStats": "kvhandoff.engine._engine",
    "TransferEngine": "kvhandoff.engine._engine",
    "TransferHandle": "kvhandoff.engine._engine",
    "TransferResult": "kvhandoff.engine._engine",
}

__all__ = [
    "POISON_BLOCK_BYTE",
    "BlockPool",
    "DoubleFreeError",
    "DrainReport",
    "EngineClosedError",
    "EngineConfig",
    "EngineConfigError",
    "EngineError",
    "EngineStats",
    "LayerReadyError",
    "NotOwnerError",
    "OutOfBlocksError",
    "PinError",
    "PoisonError",
    "PoolConfigError",
    "PoolError",
    "PoolInvariantError",
    "TransferCancelled",
    "TransferEngine",
    "TransferError",
    "TransferFailed",
    "TransferHandle",
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
