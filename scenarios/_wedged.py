"""A transport whose chosen data operations are wedged: posted on the inner transport only
when the scenario un-wedges the link (so their bytes move late, as on a NIXL/UCX link that
recovers), reported pending until then, and not cancellable while wedged (a cancel asked
meanwhile takes effect on the inner operation once the link is back)."""

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


class _WedgedHandle(TransportHandle):
    def __init__(self, owner: WedgedTransport, kind: HandleKind, buf: Any, peer: int,
                 tag: int, post: Callable[[], TransportHandle], wedged: bool) -> None:
        super().__init__(kind, peer, tag, int(buf.numel() * buf.element_size()),
                         owner._ready.append)
        self._post = post
        self.inner: TransportHandle | None = None if wedged else post()
        self.cancel_asked = False

    def unwedge(self) -> None:
        if self.inner is None:
            self.inner = self._post()
            if self.cancel_asked:
                self.inner.cancel()

    def _progress(self) -> None:
        if self.inner is not None and self.inner.test() is not HandleState.PENDING:
            self._finish(self.inner.state, self.inner.error)

    def cancel(self) -> bool:
        if self.inner is None:  # wedged: nothing can stop it now
            self.cancel_asked = True
            return False
        return self.inner.cancel()


class WedgedTransport(WrappingTransport):
    """``inner`` with the data operations posted while ``hold_new`` is set held back until
    ``unwedge()``; ``held`` counts the operations held so far."""

    def __init__(self, inner: Transport) -> None:
        super().__init__(inner)
        self.hold_new = False
        self.held = 0

    def unwedge(self) -> None:
        """The link recovers: every held operation is posted now (its bytes move now)."""
        self.hold_new = False
        for handle in list(self._live):
            assert isinstance(handle, _WedgedHandle)  # the only handles this transport makes
            handle.unwedge()

    def post_send(self, buf: Any, peer: int, tag: int) -> TransportHandle:
        return self._wrap(HandleKind.SEND, buf, peer, tag,
                          lambda: self.inner.post_send(buf, peer, tag))

    def post_recv(self, buf: Any, peer: int, tag: int) -> TransportHandle:
        return self._wrap(HandleKind.RECV, buf, peer, tag,
                          lambda: self.inner.post_recv(buf, peer, tag))

    def _wrap(self, kind: HandleKind, buf: Any, peer: int, tag: int,
              post: Callable[[], TransportHandle]) -> TransportHandle:
        self._check_open(f"post_{kind.value}")
        handle = _WedgedHandle(self, kind, buf, peer, tag, post, self.hold_new)
        self.held += int(self.hold_new)
        return self._track(handle)
