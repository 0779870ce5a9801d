"""A transport whose chosen data operations are wedged, as on a NIXL/UCX link that stalls
and later recovers.

An operation posted while ``hold_new`` is set is held: it is not posted on the inner
transport, and it reports pending, for as long as the link is wedged; it cannot be
cancelled meanwhile (``cancel()`` returns False and the request is remembered). After
``recover()`` each held operation is settled at its next progress, by whichever thread
drives the transport (so ``recover()`` itself touches no transport state and may be called
from another thread): one whose cancel was asked fails ``"cancelled"`` without ever being
posted (no byte moved); any other is posted on the inner transport then, so its bytes move
late, into or out of whatever memory its buffer is by then. Progress on any handle settles
every handle (as on MPI or UCX), so the later operations of a thread frozen on a held one
still complete.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvhandoff.engine.transports import (
    HandleKind,
    HandleState,
    Transport,
    TransportHandle,
    WrappingTransport,
)


class WedgedTransport(WrappingTransport):
    """``inner`` with the data operations posted while ``hold_new`` is set held back until
    the link recovers (``recover()``); ``held`` counts the operations held so far."""

    def __init__(self, inner: Transport) -> None:
        super().__init__(inner)
        self.hold_new = False
        self.held = 0
        self.recovered = False

    def recover(self) -> None:
        """The link recovers: every held operation settles at its next progress (see the
        module doc). New operations are no longer held."""
        self.hold_new = False
        self.recovered = True

    def _advance(self) -> None:
        self.inner.poll()
        live: list[TransportHandle] = []
        for handle in self._live:
            assert isinstance(handle, _WedgedHandle)  # the only handles this transport makes
            handle._settle()
            if not handle.final:
                live.append(handle)
        self._live[:] = live

    def post_send(self, buf: Any, peer: int, tag: int) -> TransportHandle:
        return self._wrap(HandleKind.SEND, buf, peer, tag,
                          lambda: self.inner.post_send(buf, peer, tag))

    def post_recv(self, buf: Any, peer: int, tag: int) -> TransportHandle:
        return self._wrap(HandleKind.RECV, buf, peer, tag,
                          lambda: self.inner.post_recv(buf, peer, tag))

    def _wrap(self, kind: HandleKind, buf: Any, peer: int, tag: int,
              post: Callable[[], TransportHandle]) -> TransportHandle:
        self._check_open(f"post_{kind.value}")
        held = self.hold_new and not self.recovered
        handle = _WedgedHandle(self, kind, buf, peer, tag, post, held)
        self.held += int(held)
        return self._track(handle)


class _WedgedHandle(TransportHandle):
    def __init__(self, owner: WedgedTransport, kind: HandleKind, buf: Any, peer: int,
                 tag: int, post: Callable[[], TransportHandle], wedged: bool) -> None:
        super().__init__(kind, peer, tag, int(buf.numel() * buf.element_size()),
                         owner._ready.append)
        self._owner = owner
        self._post = post
        self.inner: TransportHandle | None = None if wedged else post()
        self.cancel_asked = False

    def _progress(self) -> None:
        # As on MPI or UCX, making progress on one operation makes progress on all of them:
        # a held operation does not stop the others from completing.
        self._owner._advance()

    def _settle(self) -> None:
        if self.inner is None:
            if not self._owner.recovered:
                return
            if self.cancel_asked:
                self._finish(HandleState.FAILED, "cancelled")
                return
            self.inner = self._post()
        if self.inner.test() is not HandleState.PENDING:
            self._finish(self.inner.state, self.inner.error)

    def cancel(self) -> bool:
        if self.final:
            return False
        if self.inner is None:  # wedged: nothing can stop it now
            self.cancel_asked = True
            return False
        return self.inner.cancel()
