"""The watchdog thread and the SIGUSR1 dump.

One daemon thread per process watches every registered communicator's flight recorder. An
entry still pending past its deadline plus a grace period means the owner never got to check
its own deadline (blocked in C, or a handle nobody polls): the watchdog dumps that
communicator's recorder once, with reason ``watchdog``. SIGUSR1 asks the same thread to dump
every registered communicator (reason ``signal``); the handler only sets a flag, so it is
safe whatever the main thread was doing.
"""

from __future__ import annotations

import signal
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._comm import CheckedComm

INTERVAL_S = 0.1
MAX_GRACE_S = 1.0

_comms: weakref.WeakSet[CheckedComm] = weakref.WeakSet()
_lock = threading.Lock()
_wake = threading.Event()
_signal_pending = False
_thread: threading.Thread | None = None
_handler_installed = False


def register(comm: CheckedComm) -> None:
    """Watch ``comm``; starts the thread and installs the SIGUSR1 handler on first use."""
    global _thread
    with _lock:
        _comms.add(comm)
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="kvhandoff-watchdog", daemon=True)
            _thread.start()
    _install_signal_handler()


def unregister(comm: CheckedComm) -> None:
    with _lock:
        _comms.discard(comm)


def dump_all(reason: str = "request") -> int:
    """Dump the flight recorder of every live communicator in this process; returns how many."""
    with _lock:
        comms = list(_comms)
    for comm in comms:
        comm.dump(reason)
    return len(comms)


def _on_signal(_signum: int, _frame: Any) -> None:
    global _signal_pending
    _signal_pending = True
    _wake.set()


def _install_signal_handler() -> None:
    global _handler_installed
    if _handler_installed or not hasattr(signal, "SIGUSR1"):
        return
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be installed from the main thread
    # Never override a handler the host program installed.
    if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGUSR1, _on_signal)
    _handler_installed = True


def _run() -> None:
    global _signal_pending
    while True:
        _wake.wait(INTERVAL_S)
        _wake.clear()
        if _signal_pending:
            _signal_pending = False
            dump_all("signal")
        now = time.time()
        with _lock:
            comms = list(_comms)
        for comm in comms:
            for entry in comm.recorder.pending():
                grace = min(MAX_GRACE_S, 0.5 * (entry.deadline - entry.start))
                if not entry.watchdog_dumped and now > entry.deadline + grace:
                    entry.watchdog_dumped = True
                    comm.dump("watchdog")
