"""``Agreement`` on its own (sans-I/O, no engine): outcome is a union, quiescence an
intersection, each report is said once, a request left unsettled comes due after the grace,
and a broken group leaves each rank deciding alone."""

from __future__ import annotations

from typing import NamedTuple

import pytest
from kvhandoff.engine._agreement import (
    FAILED,
    OK,
    QUIESCENT,
    Agreement,
    GroupFailure,
    absorb_round,
)
from kvhandoff.sessions import FailureReason


class Verdict(NamedTuple):
    failure: GroupFailure | None
    all_ok: bool
    all_quiescent: bool


def verdict_of(agreement: Agreement, request_id: str) -> Verdict:
    return Verdict(*agreement.verdict(request_id))


def failure(agreement: Agreement, request_id: str) -> GroupFailure | None:
    return agreement.verdict(request_id)[0]


def test_agreement_outcome_is_a_union_first_failure_wins() -> None:
    agreement = Agreement(size=3, grace_s=10.0)
    agreement.absorb(0, [("r", OK, None, None)], now=0.0)
    assert not verdict_of(agreement, "r").all_ok and failure(agreement, "r") is None
    agreement.absorb(2, [("r", FAILED, "peer_lost", "rank 5 silent")], now=0.0)
    agreement.absorb(1, [("r", FAILED, "transport_error", None)], now=0.0)
    assert failure(agreement, "r") == GroupFailure(2, FailureReason.PEER_LOST, "rank 5 silent")
    assert failure(agreement, "r").describe() == "tp rank 2: rank 5 silent"  # type: ignore[union-attr]


def test_agreement_completes_only_when_every_rank_is_ok() -> None:
    agreement = Agreement(size=2, grace_s=10.0)
    agreement.absorb(1, [("r", OK, None, None)], now=0.0)
    assert not verdict_of(agreement, "r").all_ok
    agreement.absorb(0, [("r", OK, None, None)], now=0.0)
    assert verdict_of(agreement, "r").all_ok


def test_agreement_quiescence_is_an_intersection() -> None:
    agreement = Agreement(size=2, grace_s=10.0)
    assert agreement.absorb(0, [("r", QUIESCENT, None, None)], now=0.0) == ["r"]
    assert not verdict_of(agreement, "r").all_quiescent and agreement.quiescent_ranks("r") == [0]
    agreement.absorb(1, [("r", QUIESCENT, None, None)], now=0.0)
    assert verdict_of(agreement, "r").all_quiescent
    agreement.settle("r")
    assert not agreement.known("r")


def test_agreement_reports_each_code_once_until_forgotten() -> None:
    agreement = Agreement(size=2, grace_s=10.0)
    agreement.report("r", OK)
    agreement.report("r", OK)
    agreement.report("r", FAILED, FailureReason.CANCELLED, "host")
    agreement.mark_reported("r", QUIESCENT)
    agreement.report("r", QUIESCENT)
    assert agreement.take_reports() == [("r", OK, None, None),
                                        ("r", FAILED, "cancelled", "host")]
    assert not agreement.has_reports
    agreement.forget("r")  # released: a new request of that id reports afresh
    agreement.report("r", OK)
    assert agreement.take_reports() == [("r", OK, None, None)]


def test_agreement_unsettled_request_comes_due_after_the_grace() -> None:
    agreement = Agreement(size=2, grace_s=5.0)
    agreement.absorb(0, [("lonely", QUIESCENT, None, None)], now=100.0)
    assert agreement.due_unsettled(104.0) == []
    assert agreement.due_unsettled(105.5) == ["lonely"]
    assert agreement.due_unsettled(105.6) == []  # handed out once
    agreement.recheck("lonely", now=105.6)
    assert agreement.due_unsettled(111.0) == ["lonely"]
    # A group of one never waits: nothing is unsettled.
    alone = Agreement(size=1, grace_s=5.0)
    alone.absorb(0, [("r", OK, None, None)], now=0.0)
    assert not alone.has_unsettled and verdict_of(alone, "r").all_ok


def test_agreement_broken_group_decides_alone() -> None:
    agreement = Agreement(size=2, grace_s=5.0)
    agreement.absorb(1, [("r", OK, None, None)], now=0.0)
    agreement.break_group("CollectiveDesyncError: ...")
    assert agreement.broken == "CollectiveDesyncError: ..." and agreement.size == 1
    assert not agreement.known("r") and not agreement.has_unsettled
    agreement.absorb(0, [("r", OK, None, None)], now=1.0)
    assert verdict_of(agreement, "r").all_ok


def test_agreement_absorb_round_reads_every_rank_in_order() -> None:
    agreement = Agreement(size=2, grace_s=5.0)
    done, touched = absorb_round(agreement, [(True, [("a", OK, None, None)]),
                                             (False, [("b", QUIESCENT, None, None),
                                                      ("a", OK, None, None)])], now=0.0)
    assert (done, touched) == (False, ["a", "b", "a"])
    assert verdict_of(agreement, "a").all_ok and not verdict_of(agreement, "b").all_quiescent
    assert absorb_round(agreement, [(True, []), (True, [])], now=0.0) == (True, [])


def test_agreement_needs_at_least_one_rank() -> None:
    with pytest.raises(ValueError):
        Agreement(size=0, grace_s=1.0)
