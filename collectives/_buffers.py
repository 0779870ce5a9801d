"""Helpers for buffer collectives: numpy arrays and torch tensors, told apart without
importing torch (torch is only imported when a tensor is actually handed in)."""

from __future__ import annotations

import functools
from typing import Any

from .errors import CollectiveArgumentError

BUFFER_REDUCE_OPS = ("sum", "min", "max")


# numpy.ndarray and torch.Tensor always have a dtype: their kind is cached per type.
_KIND_OF_TYPE: dict[type, str] = {}
# numpy dtype -> its name in the fingerprint (``dtype.str`` is slower than a dict hit).
_NUMPY_DTYPE_NAMES: dict[Any, str] = {}


def buffer_kind(buffer: object) -> str:
    """``"numpy"`` or ``"torch"``; anything else is a CollectiveArgumentError."""
    cls = type(buffer)
    found = _KIND_OF_TYPE.get(cls)
    if found is not None:
        return found
    module = cls.__module__
    if module == "numpy" and hasattr(buffer, "dtype"):
        if cls.__name__ == "ndarray":
            _KIND_OF_TYPE[cls] = "numpy"
        return "numpy"
    if module.startswith("torch") and hasattr(buffer, "dtype"):
        if cls.__name__ == "Tensor":
            _KIND_OF_TYPE[cls] = "torch"
        return "torch"
    raise CollectiveArgumentError(
        f"buffer collectives take a numpy array or a torch tensor, got {type(buffer).__name__}; "
        "use the object form (allgather/allreduce) for other Python objects"
    )


def describe(buffer: Any) -> tuple[str, str, tuple[int, ...]]:
    """(kind, dtype, shape): the part of a buffer call that must agree across ranks.

    numpy's ``str(dtype)`` runs Python code; ``dtype.str`` (e.g. ``<i8``) is a C attribute."""
    kind = _KIND_OF_TYPE.get(type(buffer)) or buffer_kind(buffer)
    dtype = buffer.dtype
    if kind == "numpy":
        name = _NUMPY_DTYPE_NAMES.get(dtype)
        if name is None:
            name = dtype.str
            if len(_NUMPY_DTYPE_NAMES) < 256:
                _NUMPY_DTYPE_NAMES[dtype] = name
    else:
        name = str(dtype)
    shape = buffer.shape
    return (kind, name, shape if type(shape) is tuple else tuple(shape))


def copy(buffer: Any) -> Any:
    """A private copy, so a peer never aliases this rank's memory (in-process backend)."""
    if buffer_kind(buffer) == "torch":
        return buffer.detach().clone()
    return buffer.copy()


def stack(buffers: list[Any]) -> Any:
    """Stack per-rank buffers along a new leading axis of length size."""
    if buffer_kind(buffers[0]) == "torch":
        import torch

        return torch.stack(buffers)
    import numpy as np

    return np.stack(buffers)


def reduce(buffers: list[Any], reduce_op: str) -> Any:
    """Elementwise reduction of per-rank buffers in rank order (deterministic)."""
    if buffer_kind(buffers[0]) == "torch":
        import torch

        fns: dict[str, Any] = {"sum": torch.add, "min": torch.minimum, "max": torch.maximum}
    else:
        import numpy as np

        fns = {"sum": np.add, "min": np.minimum, "max": np.maximum}
    return functools.reduce(fns[reduce_op], buffers)


def check_reduce_op(reduce_op: str) -> None:
    if reduce_op not in BUFFER_REDUCE_OPS:
        raise CollectiveArgumentError(
            f"buffer allreduce supports {BUFFER_REDUCE_OPS}, got {reduce_op!r}; use the object "
            "allreduce for or/and"
        )


def inline_numpy(buffer: Any, described: tuple[str, str, tuple[int, ...]], limit: int) -> bool:
    """True when ``buffer`` (``describe``'d) is a numpy array of plain numbers of at most
    ``limit`` bytes: small enough to travel inline with its fingerprint (as ``tobytes()``,
    C order whatever its strides)."""
    # Plain numbers only (dtype.str's second character is the kind): for them ``dtype.str``
    # and the shape, both in the fingerprint, fix the choice, so every rank whose
    # fingerprint agrees makes the same one.
    return (limit > 0 and described[0] == "numpy" and described[1][1] in "biufc"
            and buffer.nbytes <= limit)


def rows_to_result(dtype: Any, shape: tuple[int, ...], reduce_op: str | None,
                   rows: list[Any]) -> Any:
    """Per-rank raw bytes of numpy arrays of ``dtype`` and ``shape`` as the result of a buffer
    collective: stacked along a new leading axis of length ``len(rows)``, or reduced."""
    np = _numpy()
    # A fresh writable bytearray under the array: nothing aliases a channel or a peer.
    joined = np.frombuffer(bytearray().join(rows), dtype=dtype)
    return stacked_result(joined.reshape((len(rows), *shape)), reduce_op)


_np: Any = None


def _numpy() -> Any:
    """numpy, imported on first use (a function-level import costs on every call)."""
    global _np
    if _np is None:
        import numpy

        _np = numpy
    return _np


def stacked_result(gathered: Any, reduce_op: str | None) -> Any:
    """``gathered`` (numpy, leading axis = rank) itself, or its elementwise reduction in rank
    order, as buffer collectives on raw-buffer backends return it."""
    if reduce_op is None:
        return gathered
    import numpy as np

    fn = {"sum": np.add, "min": np.minimum, "max": np.maximum}[reduce_op]
    acc = gathered[0].copy()
    for row in gathered[1:]:
        fn(acc, row, out=acc)
    return acc


def numpy_to_torch(array: Any) -> Any:
    """A torch tensor sharing ``array``'s memory (backends that move tensors as numpy)."""
    import torch

    return torch.from_numpy(array)
