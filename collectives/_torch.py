"""The torch.distributed backend (the only module besides the buffer helpers that imports
torch).

Same wire protocol as the MPI backend, over ``all_gather`` of uint8 tensors with
``async_op=True`` and polled with ``Work.is_completed()``: a fixed-size slot per rank (prefix,
pickled fingerprint, and the pickled payload when it fits), then, only if every contribution
is NORMAL and some body did not fit, a second ``all_gather`` of the bodies padded to the
longest. Positions travel through the group's key-value store, only after half of a deadline
has passed.
"""

from __future__ import annotations

import pickle
import struct
import time
from collections.abc import Callable
from typing import Any

from ._backend import ABORT, CLOSED, NORMAL, Contribution
from ._record import Position
from .errors import BackendUnavailableError

try:
    import torch
    import torch.distributed as dist
except ImportError as exc:  # pragma: no cover - torch is a dependency
    raise BackendUnavailableError(
        "the torch.distributed backend needs torch: `pip install torch`") from exc

SLOT_BYTES = 512
_PREFIX = struct.Struct("<BII")
_SPIN_TESTS = 200
_REDUCE = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
_instances = 0


def _slot_bytes(tensor: Any) -> bytes:
    return bytes(tensor.numpy().tobytes())


class _TorchExchange:
    __slots__ = ("_body", "_group", "_outs", "_outs2", "_phase", "_prefixes", "_send", "_work",
                 "polls", "size")

    def __init__(self, group: Any, size: int, kind: int, header: bytes,
                 payload: bytes) -> None:
        self._group = group
        self.size = size
        self.polls = 0
        body_len = len(header) + len(payload)
        send = bytearray(SLOT_BYTES)
        _PREFIX.pack_into(send, 0, kind, len(header), len(payload))
        if _PREFIX.size + body_len <= SLOT_BYTES:
            send[_PREFIX.size:_PREFIX.size + body_len] = header + bytes(payload)
            self._body = b""
        else:
            self._body = header + bytes(payload)
        # Held on self: the async work reads this memory until it completes.
        self._send = send_t = torch.frombuffer(send, dtype=torch.uint8)
        self._outs = [torch.empty(SLOT_BYTES, dtype=torch.uint8) for _ in range(size)]
        self._outs2: list[Any] | None = None
        self._prefixes: list[tuple[int, int, int]] = []
        self._work = dist.all_gather(self._outs, send_t, group=group, async_op=True)
        self._phase = 1

    def test(self) -> bool:
        if self._phase == 3:
            return True
        self.polls += 1
        if not self._work.is_completed():
            return False
        self._work.wait()  # completed: returns at once and surfaces a backend error
        if self._phase == 1:
            self._prefixes = [_PREFIX.unpack_from(_slot_bytes(t[:_PREFIX.size]))
                              for t in self._outs]
            overflow = [0 if _PREFIX.size + h + p <= SLOT_BYTES else h + p
                        for _k, h, p in self._prefixes]
            if all(k == NORMAL for k, _h, _p in self._prefixes) and any(overflow):
                longest = max(overflow)
                padded = bytearray(longest)
                padded[:len(self._body)] = self._body
                self._outs2 = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.size)]
                self._send = torch.frombuffer(padded, dtype=torch.uint8)
                self._work = dist.all_gather(self._outs2, self._send, group=self._group,
                                             async_op=True)
                self._phase = 2
                return self.test()
        self._phase = 3
        return True

    def agreed(self) -> None:
        """No fast path: CheckedComm checks every contribution()."""
        return None

    def contributions(self) -> list[Contribution]:
        out: list[Contribution] = []
        for rank, (kind, hlen, plen) in enumerate(self._prefixes):
            if _PREFIX.size + hlen + plen <= SLOT_BYTES:
                body = _slot_bytes(self._outs[rank])[_PREFIX.size:_PREFIX.size + hlen + plen]
            elif self._outs2 is None:  # a peer aborted or closed: no phase 2 happened
                out.append((kind, None, None))
                continue
            else:
                body = _slot_bytes(self._outs2[rank])[:hlen + plen]
            header = pickle.loads(body[:hlen]) if kind != CLOSED else None
            out.append((kind, header, body[hlen:]))
        return out


class _TorchBufferExchange:
    __slots__ = ("_make_result", "_work", "polls")

    def __init__(self, work: Any, make_result: Callable[[], Any]) -> None:
        self._work = work
        self._make_result = make_result
        self.polls = 0

    def test(self) -> bool:
        self.polls += 1
        if not self._work.is_completed():
            return False
        self._work.wait()
        return True

    def result(self) -> Any:
        return self._make_result()


class TorchBackend:
    """A checked view of a torch.distributed process group (initialized by the caller)."""

    piggyback_buffers = False
    inline_buffer_bytes = 0

    def __init__(self, group: Any, name: str, store: Any) -> None:
        global _instances
        if not dist.is_available() or not dist.is_initialized():
            raise BackendUnavailableError(
                "torch.distributed is not initialized: call "
                "torch.distributed.init_process_group('gloo', ...) first")
        if group is None:
            # A private group (collective on the world), so this wrapper's traffic never
            # matches the caller's own collectives on the default group.
            group = dist.new_group(backend="gloo")
        self._group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.log_rank = dist.get_rank()
        if store is None:
            from torch.distributed import distributed_c10d

            store = distributed_c10d._get_default_store()
        self._store = store
        # Instances are created collectively in the same order on every rank.
        _instances += 1
        self._prefix = f"kvhandoff/{name}/{_instances}/pos/"
        self._lingering: list[Any] = []

    def post(self, seq: int, kind: int, header: tuple[Any, ...], payload: Any,
             same_len: bool = False) -> _TorchExchange:
        exchange = _TorchExchange(self._group, self.size, kind,
                                  pickle.dumps(header, pickle.HIGHEST_PROTOCOL), payload)
        if kind == ABORT:
            self._lingering.append(exchange)
        return exchange

    def _as_tensor(self, buffer: Any) -> tuple[Any, bool]:
        if type(buffer).__module__.startswith("torch"):
            return buffer.detach().contiguous(), False
        return torch.from_numpy(buffer).contiguous(), True

    def post_buffer_allgather(self, buffer: Any) -> _TorchBufferExchange:
        send, to_numpy = self._as_tensor(buffer)
        outs = [torch.empty_like(send) for _ in range(self.size)]
        work = dist.all_gather(outs, send, group=self._group, async_op=True)

        def stacked() -> Any:
            out = torch.stack(outs)
            return out.numpy() if to_numpy else out

        return _TorchBufferExchange(work, stacked)

    def post_buffer_allreduce(self, buffer: Any, reduce_op: str) -> _TorchBufferExchange:
        send, to_numpy = self._as_tensor(buffer)
        result = send.clone()
        work = dist.all_reduce(result, op=_REDUCE[reduce_op], group=self._group, async_op=True)
        return _TorchBufferExchange(work, lambda: result.numpy() if to_numpy else result)

    def block(self, exchange: Any, max_s: float) -> None:
        if exchange is not None and exchange.polls < _SPIN_TESTS:
            return
        time.sleep(min(max_s, 0.0005))

    def announce(self, position: Position) -> None:
        if self._store is None:
            return
        try:
            self._store.set(f"{self._prefix}{self.rank}", pickle.dumps(position.to_wire()))
        except (RuntimeError, OSError):
            pass  # best effort: the store's host may be gone; positions are then unknown

    def positions(self) -> dict[int, Position | None]:
        found: dict[int, Position | None] = {r: None for r in range(self.size)}
        if self._store is None:
            return found
        try:
            for peer in range(self.size):
                key = f"{self._prefix}{peer}"
                if self._store.check([key]):  # get() of a missing key would block
                    found[peer] = Position(*pickle.loads(self._store.get(key)))
        except (RuntimeError, OSError):
            pass  # best effort, as in announce()
        return found

    def arrived(self, seq: int, positions: dict[int, Position | None]) -> set[int]:
        return {r for r, p in positions.items()
                if p is not None and p.seq == seq and p.state in ("pending", "timeout")}

    def close(self, seq: int) -> None:
        self._lingering.append(_TorchExchange(self._group, self.size, CLOSED, b"", b""))
