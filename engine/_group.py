"""``GroupSync``: runs the TP group's agreement over its communicator and applies what the
group decided to this rank's transfers.

``Agreement`` (``_agreement.py``) says what the group decided; this part does the I/O and
the consequences. Every tick it tests the round in flight and posts the next one: a
non-blocking checked allgather carrying all of the tick's reports, posted on every rank
whatever its local state (never inside a rank-local condition: seeds 000, 001). Without a
group, or once the group broke, this rank's own reports decide at once (``settle_local``).
A broken group (desync, timeout, closed) fails every open transfer, and each rank then
releases its own blocks on its own quiescence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvhandoff.collectives import CheckedComm, CollectiveError
from kvhandoff.engine._agreement import FAILED, Agreement, absorb_round
from kvhandoff.engine._handle import TransferResult
from kvhandoff.sessions import Event, FailureReason, Role

if TYPE_CHECKING:
    from kvhandoff.engine._engine import TransferEngine

__all__ = ["GroupSync"]

_ROUND_TAG = "kvhandoff.engine.agreement"


class GroupSync:
    """The TP group of one engine (``comm`` None: a group of one)."""

    def __init__(self, engine: TransferEngine, comm: CheckedComm | None) -> None:
        self._engine = engine
        self._comm = comm
        self._comm_name = None if comm is None else comm.name
        self._timeout_s = engine.config.agreement_timeout_s
        self.agreement = Agreement(1 if comm is None else comm.size,
                                   engine.config.unsettled_grace_s)
        self._round: Any = None
        self.rounds = 0
        #: True once a round said every rank is drained and idle (or there is no group):
        #: the same round ends the agreement on every rank.
        self.done = comm is None

    @property
    def broken(self) -> str | None:
        return self.agreement.broken

    def settle_local(self) -> None:
        """Without a (working) TP group this rank is the whole group: its own reports decide
        at once. Called after the call that produced them, never re-entrantly."""
        agreement = self.agreement
        if not agreement.has_reports or agreement.size > 1:
            return
        now = self._engine._clock()
        while agreement.has_reports:
            for rid in dict.fromkeys(agreement.absorb(0, agreement.take_reports(), now)):
                self.decide(rid, now)

    def round(self, now: float, *, idle: bool) -> bool:
        """Test the round in flight and post the next one (``idle``: this rank drains and
        has nothing left). True when the round brought news."""
        comm = self._comm
        if comm is None or self.agreement.broken is not None or self.done:
            return False
        busy = False
        if self._round is not None:
            try:
                if not self._round.test():
                    return False
                results = self._round.result()
            except CollectiveError as exc:
                self._broke(exc, now)
                return True
            self._round = None
            self.rounds += 1
            all_done, touched = absorb_round(self.agreement, results, now)
            busy = bool(touched)
            for rid in dict.fromkeys(touched):
                self.decide(rid, now)
            if all_done:
                self.done = True
                return busy
        reports = self.agreement.take_reports()
        try:
            self._round = comm.iallgather((idle and not reports, reports), tag=_ROUND_TAG,
                                          timeout=self._timeout_s)
        except CollectiveError as exc:
            self._broke(exc, now)
        return busy

    def decide(self, rid: str, now: float) -> None:
        """Apply what the group decided: outcome is a union, quiescence an intersection."""
        engine, agreement = self._engine, self.agreement
        failure, all_ok, all_quiescent = agreement.verdict(rid)
        transfer = engine._transfers.get(rid)
        if transfer is not None:
            session = transfer.session
            if failure is not None:
                if not transfer.outcome_known and session.allows(Event.ABORT):
                    agreement.mark_reported(rid, FAILED)  # the group knows already
                    engine._apply(transfer, Event.ABORT, now, reason=failure.reason,
                                  detail=failure.describe()[:256])
            elif all_ok and session.allows(Event.COMPLETED):
                # The outcome is success. A confirmed sender may still wait for its own
                # handle (its receiver has every byte): the host learns the outcome now, the
                # session completes once quiescent (``DataPath._local_final`` decides again).
                if transfer.handle is not None:
                    transfer.handle._settle(TransferResult(
                        request_id=rid, role=transfer.role, peer=transfer.peer,
                        nbytes=transfer.total_nbytes, seconds=now - session.admitted_at,
                        num_tokens=transfer.num_tokens, metadata=transfer.metadata,
                    ), None)
                if session.local_final:
                    engine._apply(transfer, Event.COMPLETED, now)
                    if transfer.role is Role.RECEIVER:
                        engine._control.done(transfer)
            if all_quiescent and session.is_terminal:
                engine._release(transfer)
        if all_quiescent:
            agreement.settle(rid)

    def expire_unsettled(self, now: float) -> None:
        """Requests the group left unsettled past the grace: release each on this rank's own
        quiescence (see ``Agreement.due_unsettled``)."""
        engine, agreement = self._engine, self.agreement
        for rid in agreement.due_unsettled(now):
            transfer = engine._transfers.get(rid)
            if transfer is None:
                agreement.settle(rid)
            elif transfer.session.is_terminal:
                if engine._log_on:
                    engine._log.warning("engine.group_incomplete", request_id=rid,
                                        quiescent=agreement.quiescent_ranks(rid))
                agreement.settle(rid)
                engine._release(transfer)
            else:
                agreement.recheck(rid, now)  # still busy here: look again later

    def _broke(self, exc: CollectiveError, now: float) -> None:
        """The TP group broke: agreement is impossible, so every open transfer fails and
        each rank releases its own blocks on its own quiescence."""
        engine = self._engine
        error = f"{type(exc).__name__}: {exc}"[:512]
        self.agreement.break_group(error)
        self._round = None
        self.done = True
        if engine._log_on:
            engine._log.error("engine.tp_failed", comm=self._comm_name, error=error)
        for transfer in list(engine._transfers.values()):
            if not transfer.outcome_known and transfer.session.allows(Event.ABORT):
                engine._apply(transfer, Event.ABORT, now, reason=FailureReason.PEER_FAILED,
                              detail="tp group failed")
        for transfer in list(engine._transfers.values()):
            if transfer.session.is_terminal:
                engine._release(transfer)
        self.settle_local()
