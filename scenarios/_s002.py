"""Seed 002 (TensorRT-LLM PR 13796): a status poll that blocks on an unready transfer future,
and a host that frees KV blocks while the transfer is still in flight.

One prefill rank sends ``REQUESTS`` requests to one decode rank over the in-process loopback
transport; the link of one request (chosen by the seed) is wedged (``WedgedTransport``: its
operation is posted only when the link recovers, so its bytes land late).

Unsafe (written here, no engine): the decode host's status poll calls ``wait()`` on each
receive in turn, like ``future.get()`` on an unready future: it freezes on the wedged one
while later transfers already finished (the runner's bound ends it and says where it was).
Its timeout path then frees that request's blocks at once; when the link recovers the late
write lands in the freed blocks, and the pool's poison check catches it on the next alloc.

Safe (``TransferEngine``): the other transfers complete while one is wedged; the wedged one
is quarantined (``TransferTimeout`` from ``wait()``, not a freeze); the host's free of its
blocks is deferred until the transport lets go; health reports the quarantine and recovers;
the per-request timeout never asks for a restart.

Runs embedded only: the wedged link is an in-process transport by nature (a deterministic
stuck operation), so ``--backend mpi`` is refused with exit 2.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from kvhandoff.scenarios._runner import Verdict, hung_lines, run_threads, short_site

REQUESTS = 6
BOUND_S = 1.0
TRANSFER_TIMEOUT_S = 1.0
SAFE_MODES = ("fixed",)
EMBEDDED_ONLY = ("the wedged link is an in-process loopback transport (a deterministic stuck "
                 "operation): run it without mpiexec")


def _stuck(seed: int) -> int:
    return 1 + seed % (REQUESTS - 1)


def _pool() -> Any:
    import torch
    from kvhandoff.engine import BlockPool

    return BlockPool(2 * REQUESTS, 1, 4, 2, 8, dtype=torch.float32, debug=True)


def run_mode(mode: str, seed: int, backend: str, show_stacks: bool) -> Verdict:
    if mode == "unsafe":
        return unsafe(seed, show_stacks)
    return safe(seed)


def unsafe(seed: int, show_stacks: bool) -> Verdict:
    from kvhandoff.engine import PoisonError
    from kvhandoff.engine.transports import loopback_group
    from kvhandoff.scenarios._wedged import WedgedTransport

    stuck = _stuck(seed)
    t0, t1 = loopback_group(2)
    link = WedgedTransport(t0)
    prefill, decode = _pool(), _pool()
    srcs, dsts, recvs = [], [], []
    for i in range(REQUESTS):
        rid = f"req-{i}"
        src, dst = prefill.alloc(1, owner=rid), decode.alloc(1, owner=rid)
        prefill.key(0)[src[0]].fill_(i + 1.0)
        srcs.append(src)
        dsts.append(dst)
        recvs.append(t1.post_recv(decode.key(0)[dst[0]], 0, i + 1))
    for i in range(REQUESTS):
        link.hold_new = i == stuck
        link.post_send(prefill.key(0)[srcs[i][0]], 1, i + 1)
    link.hold_new = False

    reported: list[int] = []
    where = {"position": "before its first poll"}

    def status_poll() -> list[int]:
        """The naive poll: wait() on each transfer in turn, like future.get()."""
        for i, handle in enumerate(recvs):
            site = short_site(_here())
            where["position"] = f"wait() on req-{i}'s receive at {site}"
            handle.wait()  # blocks while this transfer is unready
            reported.append(i)
        return reported

    results, hung = run_threads([status_poll], BOUND_S, lambda _rank: where["position"])
    finished = [i for i, handle in enumerate(recvs) if handle.final]
    unreported = [i for i in finished if i not in reported]
    lines: list[str] = []
    frozen = bool(hung)
    if frozen:
        lines.append(f"frozen: the status poll was still blocked after the {BOUND_S:g} s bound "
                     f"(req-{stuck}'s link is wedged)")
        lines += ["  " + line.strip().replace("rank 0: ", "the loop was in ", 1)
                  for line in hung_lines(hung, BOUND_S, show_stacks)[1:]]
        lines.append(f"  finished but never reported by the frozen loop: "
                     f"{[f'req-{i}' for i in unreported]}")
    else:
        lines.append(f"expected the poll to freeze, it returned {results.get(0)!r}")
    # The naive timeout path: free the wedged request's blocks at once.
    freed = decode.free(dsts[stuck], owner=f"req-{stuck}")
    link.unwedge()  # the link recovers: its bytes move now, into the freed block
    poll_thread = [t for t in threading.enumerate() if t.name == "scenario-rank-0"]
    for thread in poll_thread:
        thread.join(2.0)
    caught: PoisonError | None = None
    try:
        decode.alloc(decode.num_free, owner="next-request")
    except PoisonError as exc:
        caught = exc
    if caught is not None:
        lines.append(f"late write: the host freed block(s) {freed} of req-{stuck} on timeout; "
                     "the transfer wrote them after the free")
        lines.append(f"  caught by the pool's poison check on re-alloc: {type(caught).__name__}: "
                     f"{str(caught).splitlines()[0][:120]}")
    else:
        lines.append("expected the pool's poison check to catch a late write")
    return Verdict(frozen and caught is not None and bool(unreported), lines)


def _here() -> str:
    import sys

    frame = sys._getframe(1)
    return f"{frame.f_code.co_filename}:{frame.f_lineno + 2} {frame.f_code.co_name}"


def safe(seed: int) -> Verdict:
    import anyio
    from kvhandoff.engine import EngineConfig, TransferEngine, TransferError, TransferTimeout
    from kvhandoff.engine.transports import loopback_group
    from kvhandoff.scenarios._wedged import WedgedTransport

    stuck = _stuck(seed)
    prefill, decode = _pool(), _pool()
    config = EngineConfig(queue_timeout_s=5.0, transfer_timeout_s=TRANSFER_TIMEOUT_S,
                          lease_s=10.0, drain_timeout_s=2.0, agreement_timeout_s=5.0,
                          quarantine_budget=1, progress_deadline_s=30.0, restart_grace_s=30.0)

    async def until(predicate: Any, timeout: float = 5.0) -> bool:
        with anyio.move_on_after(timeout):
            while not predicate():
                await anyio.sleep(0.002)
            return True
        return False

    async def main() -> Verdict:
        t0, t1 = loopback_group(2)
        link = WedgedTransport(t0)
        e0 = TransferEngine(prefill, link, config=config)
        e1 = TransferEngine(decode, t1, config=config)
        lines: list[str] = []
        checks: dict[str, bool] = {}
        restarts: list[bool] = []
        with anyio.fail_after(20):
            async with e0, e1:
                wedged = [stuck, 1 + (stuck % (REQUESTS - 1))]  # two: over the budget of 1
                held: dict[str, Any] = {}
                for i in wedged:
                    rid = f"req-{i}"
                    src, dst = prefill.alloc(1, owner=rid), decode.alloc(1, owner=rid)
                    link.hold_new = True
                    hs = e0.send(rid, src, 1)
                    hr = e1.receive(rid, dst, 0)
                    before = len(held)
                    checks[f"wedged {rid}"] = await until(lambda: link.held > before)  # noqa: B023
                    link.hold_new = False
                    held[rid] = (hs, hr, src, dst)
                names = ", ".join(held)
                started = time.monotonic()
                done = []
                for i in (r for r in range(REQUESTS) if r not in wedged):
                    other = f"req-{i}"
                    s, d = prefill.alloc(1, owner=other), decode.alloc(1, owner=other)
                    prefill.key(0)[s[0]].fill_(i + 1.0)
                    send, recv = e0.send(other, s, 1), e1.receive(other, d, 0)
                    await send.wait()
                    await recv.wait()
                    if bool((decode.key(0)[d[0]] == i + 1.0).all()):
                        done.append(other)
                    prefill.free(s, owner=other)
                    decode.free(d, owner=other)
                restarts.append(e0.restart_requested or e1.restart_requested)
                checks["others"] = (len(done) == REQUESTS - len(wedged)
                                    and not any(h[0].done for h in held.values()))
                lines.append(f"{len(done)} other transfers completed while the links of {names} "
                             f"were wedged ({time.monotonic() - started:.2f} s)")
                for rid, (hs, hr, src, dst) in held.items():
                    raised = []
                    timed_out = []
                    for handle in (hs, hr):
                        t = time.monotonic()
                        try:
                            await handle.wait()
                            raised.append("completed")
                        except TransferError as exc:
                            raised.append(f"{type(exc).__name__} after "
                                          f"{time.monotonic() - t:.2f} s")
                            timed_out.append(isinstance(exc, TransferTimeout))
                    # Both sides fail; whichever side's deadline fires first times out and the
                    # other hears of it from its peer (TransferFailed): either order is right.
                    checks[f"timeout {rid}"] = len(timed_out) == 2 and any(timed_out)
                    state = e0.session(rid).state
                    checks[f"quarantined {rid}"] = state.name == "QUARANTINED"
                    lines.append(f"{rid}: wait() raised {raised[0]} (send) / {raised[1]} "
                                 f"(receive), no freeze; sender session {state.name}")
                    prefill.free(src, owner=rid)
                    decode.free(dst, owner=rid)
                deferred = prefill.num_deferred
                checks["deferred"] = deferred == len(wedged)
                health = e0.health()
                checks["unhealthy"] = not health.healthy
                lines.append(f"host freed their blocks: {deferred} deferred on the sender (the "
                             f"transport may still read them); health: healthy={health.healthy} "
                             f"({health.reason}, {health.quarantined} quarantined)")
                restarts.append(e0.restart_requested or e1.restart_requested)
                link.unwedge()  # the link recovers
                checks["released"] = await until(lambda: prefill.num_deferred == 0)
                checks["recovered"] = await until(lambda: e0.health().healthy)
                decode.assert_poisoned([h[3][0] for h in held.values()])  # no late write
                lines.append("link recovered: deferred free released (num_deferred="
                             f"{prefill.num_deferred}), health healthy={e0.health().healthy},"
                             " decode blocks still poisoned (no late write)")
                restarts.append(e0.restart_requested or e1.restart_requested)

                async def drain(engine: TransferEngine) -> None:
                    await engine.drain(2.0)

                async with anyio.create_task_group() as group:
                    group.start_soon(drain, e0)
                    group.start_soon(drain, e1)
        checks["no_restart"] = not any(restarts)
        lines.append(f"restart requested: {any(restarts)} (per-request timeouts never ask)")
        failed = [name for name, good in checks.items() if not good]
        if failed:
            lines.append(f"NOT AS EXPECTED: {failed}")
        return Verdict(not failed, lines)

    return anyio.run(main)
