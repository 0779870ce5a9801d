"""kvhandoff.collectives on the in-process backend: operations, the seed scenarios, bad input,
non-blocking handles, the flight recorder, logs, watchdog and SIGUSR1."""

from __future__ import annotations

import json
import os
import pickle
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import kvhandoff.collectives as coll
import numpy as np
import pytest
import torch
from kvhandoff.analysis import schema
from kvhandoff.collectives import (
    CheckedComm,
    CollectiveAbortedError,
    CollectiveArgumentError,
    CollectiveDesyncError,
    CollectiveTimeoutError,
    CommClosedError,
    PayloadError,
    SimulationError,
    SymmetricOutbox,
    configure_logging,
    local_group,
    rank_logger,
    simulate_ranks,
)

THIS_FILE = Path(__file__).resolve()
def line_of(marker: str) -> int:
    """Line number of the line in this file that carries ``# site: <marker>``."""
    for number, line in enumerate(THIS_FILE.read_text().splitlines(), start=1):
        if line.rstrip().endswith(f"# site: {marker}"):
            return number
    raise LookupError(marker)


def site_of(marker: str, function: str) -> str:
    return f"{THIS_FILE}:{line_of(marker)} {function}"


def read_log(log_dir: Path, rank: int) -> list[dict[str, Any]]:
    text = (log_dir / f"rank-{rank}.jsonl").read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def log_dir(tmp_path: Path) -> Iterator[Path]:
    configure_logging(tmp_path)
    yield tmp_path
    configure_logging(None)


# -- the operations -------------------------------------------------------------------------


def test_all_object_operations_return_the_same_values_as_their_definition() -> None:
    def program(comm: CheckedComm) -> tuple[Any, ...]:
        r = comm.rank
        return (
            comm.allgather({"rank": r}),
            comm.gather(r * 10, root=2),
            comm.bcast(["payload"] if r == 1 else None, root=1),
            comm.allreduce(r, "sum"), comm.allreduce(r, "min"), comm.allreduce(r, "max"),
            comm.allreduce({r}, "or"), comm.allreduce(r == 0, "and"),
            comm.barrier(),
            comm.any(r == 3), comm.any(False), comm.all(True), comm.all(r != 3),
        )

    results = simulate_ranks(4, program, timeout=10)
    for rank, got in enumerate(results):
        assert got == (
            [{"rank": 0}, {"rank": 1}, {"rank": 2}, {"rank": 3}],
            [0, 10, 20, 30] if rank == 2 else None,
            ["payload"],
            6, 0, 3, {0, 1, 2, 3}, False, None, True, False, True, False,
        )


@pytest.mark.parametrize("make", [np.arange, torch.arange])
def test_buffer_operations_stack_and_reduce(make: Any) -> None:
    def program(comm: CheckedComm) -> tuple[Any, Any, Any]:
        mine = make(3) + comm.rank
        return (comm.allgather_buffer(mine), comm.allreduce_buffer(mine, "sum"),
                comm.allreduce_buffer(mine, "max"))

    for stacked, summed, maxed in simulate_ranks(3, program, timeout=10):
        assert type(stacked) is type(make(1))
        assert stacked.tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
        assert summed.tolist() == [3, 6, 9]
        assert maxed.tolist() == [2, 3, 4]


def test_buffer_shape_mismatch_is_a_desync_not_a_crash() -> None:
    def program(comm: CheckedComm) -> Any:
        return comm.allgather_buffer(np.zeros(2 + comm.rank % 2))

    results = simulate_ranks(2, program, timeout=10, return_exceptions=True)
    assert all(isinstance(e, CollectiveDesyncError) for e in results)


def test_large_payloads_round_trip() -> None:
    big = "x" * 100_000
    results = simulate_ranks(2, lambda c: c.allgather(big if c.rank else 1), timeout=10)
    assert results == [[1, big], [1, big]]


# -- seed 000: a conditional allgather inside a rank-divergent gate --------------------------


@attrs.frozen
class RankState:
    rank: int
    batch_size: int


def seed000_broken(comm: CheckedComm) -> Any:
    has_previous_batch = comm.rank % 2 == 0  # rank-local: diverges across ranks
    if has_previous_batch:
        comm.allgather(bool(comm.rank))  # site: seed000-gate
    return comm.gather(RankState(comm.rank, 4), root=0)  # site: seed000-gather


def seed000_fixed(comm: CheckedComm) -> Any:
    outbox = SymmetricOutbox(comm)
    if comm.rank % 2 == 0:
        outbox.put(bool(comm.rank))
    timed_out = outbox.flush()  # site: seed000-flush
    states = comm.gather(RankState(comm.rank, 4), root=0)
    return timed_out, states


def test_seed000_conditional_allgather_is_reported_with_both_sites() -> None:
    results = simulate_ranks(4, seed000_broken, timeout=10, return_exceptions=True)
    gate = site_of("seed000-gate", "seed000_broken")
    gather = site_of("seed000-gather", "seed000_broken")
    for rank, error in enumerate(results):
        assert isinstance(error, CollectiveDesyncError), (rank, error)
        assert not isinstance(error, TypeError)
        assert error.seq == 0
        assert {r: f.site for r, f in error.table.items()} == {
            0: gate, 1: gather, 2: gate, 3: gather}
        assert {f.op for f in error.table.values()} == {"allgather", "gather"}
        assert gate in str(error) and gather in str(error)
        assert sorted(error.mismatched_ranks) in ([0, 2], [1, 3])


def test_seed000_symmetric_outbox_runs_clean() -> None:
    results = simulate_ranks(4, seed000_fixed, timeout=10)
    assert results[0] == ([[False], [], [True], []], [RankState(r, 4) for r in range(4)])
    assert all(timed_out == [[False], [], [True], []] for timed_out, _ in results)


def test_symmetric_outbox_flush_is_one_allgather_even_when_empty() -> None:
    def program(comm: CheckedComm) -> Any:
        outbox = SymmetricOutbox(comm, tag="stats")
        got = outbox.flush()
        return got, len(outbox), [(e.op, e.tag) for e in comm.recorder.entries()]

    for got, left, ops in simulate_ranks(3, program, timeout=10):
        assert got == [[], [], []] and left == 0
        assert ops == [("allgather", "stats")]


# -- seed 001: half the ranks in one collective, half in another or in none ------------------


def seed001_mixed(comm: CheckedComm) -> Any:
    if comm.rank < 2:
        return comm.allgather("status")  # site: seed001-allgather
    return comm.allreduce(1, "sum")  # site: seed001-allreduce


def seed001_missing(comm: CheckedComm, deadline_s: float = 0.3) -> Any:
    comm.barrier(tag="start")
    if comm.rank < 2:
        return comm.allgather("status", timeout=deadline_s)  # site: seed001-lonely
    return None


def seed001_fixed(comm: CheckedComm) -> Any:
    wants_check = comm.rank < 2  # rank-local scheduler value
    if comm.any(wants_check):
        return comm.allgather("status" if wants_check else None)
    return None


def test_seed001_different_collectives_report_every_rank_position() -> None:
    results = simulate_ranks(4, seed001_mixed, timeout=10, return_exceptions=True)
    for error in results:
        assert isinstance(error, CollectiveDesyncError)
        assert {r: (f.seq, f.op, f.site) for r, f in error.table.items()} == {
            0: (0, "allgather", site_of("seed001-allgather", "seed001_mixed")),
            1: (0, "allgather", site_of("seed001-allgather", "seed001_mixed")),
            2: (0, "allreduce", site_of("seed001-allreduce", "seed001_mixed")),
            3: (0, "allreduce", site_of("seed001-allreduce", "seed001_mixed")),
        }


def test_seed001_missing_ranks_end_in_timeout_with_positions() -> None:
    results = simulate_ranks(4, seed001_missing, timeout=10, return_exceptions=True)
    assert results[2] is None and results[3] is None
    lonely = site_of("seed001-lonely", "seed001_missing")
    for rank in (0, 1):
        error = results[rank]
        assert isinstance(error, CollectiveTimeoutError), error
        assert (error.seq, error.op, error.site) == (1, "allgather", lonely)
        assert error.arrived == [0, 1] and error.missing == [2, 3]
        assert error.deadline_s == pytest.approx(0.3)
        assert error.positions[rank] == coll.Position(1, "allgather", lonely, None, "timeout")
        for peer in (2, 3):
            position = error.positions[peer]
            assert position is not None
            assert (position.seq, position.op, position.tag, position.state) == (
                0, "barrier", "start", "completed")


def test_seed001_or_gated_version_runs_clean() -> None:
    assert simulate_ranks(4, seed001_fixed, timeout=10) == [
        ["status", "status", None, None]] * 4


# -- seed 003: per-layer signals batched by rank-local timing --------------------------------


def seed003_program(comm: CheckedComm, batch_by_timing: bool) -> int:
    """Two layers become ready; rank 0 saw cache_info early and, when batching by timing,
    sends both layers in one step while rank 1 sends them one by one."""
    layers = [0, 1]
    batches = [layers] if (batch_by_timing and comm.rank == 0) else [[layer] for layer in layers]
    for _batch in batches:
        comm.barrier(tag="layer-sent")
    return comm.allreduce(len(layers), "sum", tag="layers-done")


def test_seed003_rank_local_batching_is_caught_at_the_first_mismatched_call() -> None:
    results = simulate_ranks(2, lambda c: seed003_program(c, True), timeout=10,
                             return_exceptions=True)
    for error in results:
        assert isinstance(error, CollectiveDesyncError)
        assert error.seq == 1
        assert {r: (f.op, f.tag) for r, f in error.table.items()} == {
            0: ("allreduce", "layers-done"), 1: ("barrier", "layer-sent")}


def test_seed003_identical_granularity_runs_clean() -> None:
    assert simulate_ranks(2, lambda c: seed003_program(c, False), timeout=10) == [4, 4]


# -- tags ------------------------------------------------------------------------------------


def root_bcast(comm: CheckedComm, tag: str | None) -> Any:
    if comm.rank == 0:
        return comm.bcast({"config": 1}, root=0, tag=tag)  # site: bcast-root
    return comm.bcast(None, root=0, tag=tag)  # site: bcast-other


def test_bcast_idiom_untagged_is_reported() -> None:
    results = simulate_ranks(3, lambda c: root_bcast(c, None), timeout=10,
                             return_exceptions=True)
    for error in results:
        assert isinstance(error, CollectiveDesyncError)
        assert error.table[0].site == site_of("bcast-root", "root_bcast")
        assert error.table[1].site == site_of("bcast-other", "root_bcast")
        assert error.mismatched_ranks == [0]


def test_bcast_idiom_tagged_runs_clean() -> None:
    assert simulate_ranks(3, lambda c: root_bcast(c, "config"), timeout=10) == [
        {"config": 1}] * 3


def test_tag_on_one_rank_only_is_a_desync() -> None:
    results = simulate_ranks(
        2, lambda c: c.allgather(1, tag="x" if c.rank else None), timeout=10,
        return_exceptions=True)
    assert all(isinstance(e, CollectiveDesyncError) for e in results)


def test_different_roots_or_reduce_ops_are_a_desync() -> None:
    roots = simulate_ranks(2, lambda c: c.bcast(1, root=c.rank, tag="b"), timeout=10,
                           return_exceptions=True)
    ops = simulate_ranks(2, lambda c: c.allreduce(1, "sum" if c.rank else "max", tag="r"),
                         timeout=10, return_exceptions=True)
    assert all(isinstance(e, CollectiveDesyncError) for e in roots + ops)


# -- bad input -------------------------------------------------------------------------------


def test_unpicklable_payload_raises_on_caller_and_aborts_peers() -> None:
    def program(comm: CheckedComm) -> Any:
        return comm.allgather(threading.Lock() if comm.rank == 1 else 1)

    results = simulate_ranks(3, program, timeout=30, join_timeout=10, return_exceptions=True)
    assert isinstance(results[1], PayloadError)
    assert isinstance(results[1].cause, (TypeError, pickle.PicklingError))
    for rank in (0, 2):
        assert isinstance(results[rank], CollectiveAbortedError)
        assert list(results[rank].reasons) == [1]


def test_wrong_root_on_one_rank_raises_there_and_aborts_peers() -> None:
    def program(comm: CheckedComm) -> Any:
        return comm.bcast("x", root=7 if comm.rank == 2 else 0, tag="b")

    results = simulate_ranks(3, program, timeout=30, join_timeout=10, return_exceptions=True)
    assert isinstance(results[2], CollectiveArgumentError)
    assert "root" in str(results[2])
    assert isinstance(results[0], CollectiveAbortedError) and results[0].reasons.keys() == {2}


@pytest.mark.parametrize("call", [
    lambda c: c.allreduce(1, "product"),
    lambda c: c.allgather_buffer([1, 2]),
    lambda c: c.allreduce_buffer(np.ones(2), "or"),
    lambda c: c.allgather(1, timeout=-1),
    lambda c: c.allgather(1, tag=3),
])
def test_bad_arguments_on_every_rank_raise_argument_error(call: Any) -> None:
    results = simulate_ranks(2, call, timeout=30, join_timeout=10, return_exceptions=True)
    assert all(isinstance(e, CollectiveArgumentError) for e in results)


def test_calls_after_close_raise_and_peers_do_not_hang() -> None:
    def program(comm: CheckedComm) -> Any:
        if comm.rank == 0:
            comm.close()
            comm.close()  # idempotent
            return comm.allgather(1)
        return comm.allgather(1)

    results = simulate_ranks(3, program, timeout=30, join_timeout=10, return_exceptions=True)
    assert isinstance(results[0], CommClosedError) and results[0].reason == "closed"
    for rank in (1, 2):
        assert isinstance(results[rank], CollectiveAbortedError)
        assert results[rank].reasons == {0: "closed the communicator"}


def test_comm_is_unusable_after_a_failed_call() -> None:
    def program(comm: CheckedComm) -> Any:
        with pytest.raises(CollectiveDesyncError):
            comm.allgather(1, tag=str(comm.rank))
        assert comm.closed
        with pytest.raises(CommClosedError):
            comm.barrier()
        return "ok"

    assert simulate_ranks(2, program, timeout=10) == ["ok", "ok"]


def test_constructor_and_group_arguments_are_validated() -> None:
    with pytest.raises(CollectiveArgumentError):
        local_group(0)
    with pytest.raises(CollectiveArgumentError):
        local_group(2, timeout=0)
    with pytest.raises(CollectiveArgumentError):
        local_group(2, buffer_check="sometimes")
    with pytest.raises(ValueError):
        local_group(2, recorder_capacity=0)


def test_simulate_ranks_raises_simulation_error_with_per_rank_data() -> None:
    def program(comm: CheckedComm) -> int:
        if comm.rank == 1:
            raise RuntimeError("boom")
        return comm.rank

    with pytest.raises(SimulationError) as info:
        simulate_ranks(2, program, timeout=10)
    assert list(info.value.errors) == [1] and info.value.results == {0: 0}


# -- non-blocking handles and local groups driven from one thread ----------------------------


def test_local_group_nonblocking_handles_from_one_thread() -> None:
    comms = local_group(3, "tp", timeout=10)
    handles = [c.iallgather(c.rank * 2, tag="agree") for c in comms[:2]]
    assert not any(h.test() for h in handles)  # rank 2 has not posted: never blocks
    handles.append(comms[2].iallgather(4, tag="agree"))
    assert all(h.test() for h in handles)
    assert [h.result() for h in handles] == [[0, 2, 4]] * 3
    assert all(h.done for h in handles)


def test_nonblocking_mismatch_raises_from_test_and_result() -> None:
    comms = local_group(2, "tp", timeout=10)
    first = comms[0].iallgather(1, tag="agree")
    second = comms[1].iany(True, tag="agree")
    with pytest.raises(CollectiveDesyncError) as info:
        first.test()
    with pytest.raises(CollectiveDesyncError) as again:
        first.result()
    assert again.value is info.value
    with pytest.raises(CollectiveDesyncError):
        second.result()


def diverging_then_pending(comm: CheckedComm) -> Any:
    """Issue 13 item 3: rank 1 skips a collective its peers issue, then every rank posts two
    non-blocking calls and waits on the second only."""
    if comm.rank != 1:
        comm.allreduce(1)  # site: diverge-allreduce
    first = comm.ibarrier()  # site: diverge-ibarrier
    second = comm.iallgather(comm.rank)
    try:
        return second.result()
    except CollectiveDesyncError as exc:
        # The earlier call carries the same error, and the later one is failed, not pending.
        with pytest.raises(CollectiveDesyncError) as again:
            first.result()
        assert again.value is exc
        assert second.entry.state in ("failed", "desync")
        raise


def test_a_wait_surfaces_an_earlier_pending_calls_desync() -> None:
    # Before the fix rank 1 waited on its second call only and ended at the deadline with
    # CollectiveTimeoutError, while ranks 0 and 2 had seen the desync of seq 0 at once.
    results = simulate_ranks(3, diverging_then_pending, timeout=10, return_exceptions=True)
    allreduce = site_of("diverge-allreduce", "diverging_then_pending")
    ibarrier = site_of("diverge-ibarrier", "diverging_then_pending")
    for rank, error in enumerate(results):
        assert isinstance(error, CollectiveDesyncError), (rank, error)
        assert error.seq == 0
        assert {r: (f.op, f.site) for r, f in error.table.items()} == {
            0: ("allreduce", allreduce), 1: ("barrier", ibarrier), 2: ("allreduce", allreduce)}
        assert allreduce in str(error) and ibarrier in str(error)
        assert error.mismatched_ranks == [1]


def test_test_on_a_later_handle_raises_an_earlier_desync_without_waiting() -> None:
    comms = local_group(3, "tp", timeout=10)
    peers = [comms[0].iallreduce(1), comms[2].iallreduce(1)]
    first = comms[1].ibarrier()
    second = comms[1].iallgather(1)
    with pytest.raises(CollectiveDesyncError) as info:
        second.test()  # never blocks, and nobody polled ``first``
    assert info.value.seq == 0 and info.value.mismatched_ranks == [1]
    for handle in (first, second):
        with pytest.raises(CollectiveDesyncError) as again:
            handle.test()
        assert again.value is info.value
    for handle in peers:
        with pytest.raises(CollectiveDesyncError):
            handle.result()


def test_a_rank_that_timed_out_aborts_its_peers_next_call() -> None:
    # Rank 0 gives up on seq 0 (rank 2 was late); ranks 1 and 2 then complete seq 0 with
    # rank 0's contribution and must learn at seq 1 that rank 0 is gone, not at a deadline.
    comms = local_group(3, "tp", timeout=10)
    with pytest.raises(CollectiveTimeoutError):
        comms[0].allgather("a", tag="t", timeout=0.05)
    late = [comms[1].iallgather("b", tag="t"), comms[2].iallgather("c", tag="t")]
    assert [h.result() for h in late] == [["a", "b", "c"]] * 2
    nexts = [comms[1].iallgather("d", tag="t"), comms[2].iallgather("e", tag="t")]
    for handle in nexts:
        with pytest.raises(CollectiveAbortedError) as info:
            handle.test()
        assert list(info.value.reasons) == [0]
        assert "seq 0" in info.value.reasons[0] and "timed out" in info.value.reasons[0]


def test_nonblocking_deadline_is_checked_inside_test() -> None:
    comms = local_group(2, "tp", timeout=0.5)
    handle = comms[0].iallgather(1)
    assert handle.test() is False
    time.sleep(0.6)
    with pytest.raises(CollectiveTimeoutError) as info:
        handle.test()
    assert info.value.arrived == [0] and info.value.missing == [1]
    assert info.value.positions[1] is None


def test_timeout_log_leaves_out_unknown_positions(log_dir: Path) -> None:
    comms = local_group(2, "tp", timeout=0.05)
    with pytest.raises(CollectiveTimeoutError):
        comms[0].allgather(1)
    (line,) = [x for x in read_log(log_dir, 0) if x["event"] == "collective.timeout"]
    assert_schema(line)
    assert list(line["positions"]) == ["0"] and line["missing"] == [1]


def test_blocking_call_on_a_single_thread_group_times_out_instead_of_hanging() -> None:
    comms = local_group(2, "tp", timeout=0.1)
    with pytest.raises(CollectiveTimeoutError):
        comms[0].barrier()


def test_every_nonblocking_form_matches_its_blocking_result() -> None:
    def program(comm: CheckedComm) -> list[Any]:
        handles = [
            comm.iallgather(comm.rank), comm.igather(comm.rank, root=1),
            comm.ibcast("b", root=0, tag="b"), comm.iallreduce(comm.rank, "max"),
            comm.ibarrier(), comm.iany(comm.rank == 0), comm.iall(comm.rank == 0),
            comm.iallgather_buffer(np.full(2, comm.rank)),
            comm.iallreduce_buffer(np.full(2, comm.rank), "sum"),
        ]
        return [h.result() for h in handles]

    results = simulate_ranks(2, program, timeout=10)
    for rank, got in enumerate(results):
        assert got[:7] == [[0, 1], [0, 1] if rank == 1 else None, "b", 1, None, True, False]
        assert got[7].tolist() == [[0, 0], [1, 1]] and got[8].tolist() == [1, 1]


# -- flight recorder and call sites ----------------------------------------------------------


def test_flight_recorder_keeps_a_bounded_ring_with_states() -> None:
    def program(comm: CheckedComm) -> list[Any]:
        for i in range(5):
            comm.allgather([i] * 3)  # site: recorder-loop
        return comm.recorder.entries()

    entries = simulate_ranks(2, program, timeout=10, recorder_capacity=3)[0]
    assert [e.seq for e in entries] == [2, 3, 4]
    assert all(e.state == "completed" and e.end is not None and e.end >= e.start
               for e in entries)
    assert entries[0].summary == "list[3]"
    assert entries[0].site == site_of("recorder-loop", "program")


def test_call_site_is_the_first_frame_outside_collectives() -> None:
    def program(comm: CheckedComm) -> str:
        SymmetricOutbox(comm).flush()  # site: outbox-caller
        return comm.recorder.entries()[-1].site

    assert simulate_ranks(2, program, timeout=10) == [site_of("outbox-caller", "program")] * 2


# -- logs ------------------------------------------------------------------------------------


def assert_schema(line: dict[str, Any]) -> None:
    # The one schema (kvhandoff.analysis.schema) says which keys each event carries.
    assert schema.check_line(line) == [], line
    assert set(line) == set(schema.event_keys(line["event"])), line
    assert list(line)[:4] == ["ts", "rank", "event", "level"]
    assert isinstance(line["ts"], float) and line["level"] in ("debug", "info", "warning",
                                                               "error")


def test_seed000_desync_leaves_complete_rank_logs(log_dir: Path) -> None:
    simulate_ranks(4, seed000_broken, timeout=10, return_exceptions=True)
    for rank in range(4):
        lines = read_log(log_dir, rank)
        for line in lines:
            assert_schema(line)
            assert line["rank"] == rank
        desync = [x for x in lines if x["event"] == "collective.desync"]
        dumps = [x for x in lines if x["event"] == "flight_recorder.dump"]
        assert len(desync) == 1 and len(dumps) == 1
        assert desync[0]["ranks"]["1"]["site"] == site_of("seed000-gather", "seed000_broken")
        assert desync[0]["ranks"]["0"]["op"] == "allgather"
        assert dumps[0]["reason"] == "desync"
        assert dumps[0]["entries"][-1]["state"] == "desync"


def test_seed001_timeout_leaves_complete_rank_logs(log_dir: Path) -> None:
    simulate_ranks(4, seed001_missing, timeout=10, return_exceptions=True)
    for rank in (0, 1):
        lines = read_log(log_dir, rank)
        for line in lines:
            assert_schema(line)
        (timeout,) = [x for x in lines if x["event"] == "collective.timeout"]
        assert timeout["arrived"] == [0, 1] and timeout["missing"] == [2, 3]
        assert timeout["positions"]["3"]["op"] == "barrier"
        assert any(x["event"] == "flight_recorder.dump" and x["reason"] == "timeout"
                   for x in lines)


def test_per_call_logging_writes_enter_and_exit(tmp_path: Path) -> None:
    configure_logging(tmp_path, per_call=True)
    try:
        simulate_ranks(2, lambda c: c.allgather(1, tag="t"), timeout=10)
    finally:
        configure_logging(None)
    lines = read_log(tmp_path, 1)
    assert [x["event"] for x in lines] == ["collective.enter", "collective.exit"]
    for line in lines:
        assert_schema(line)
    assert lines[1]["state"] == "completed" and lines[0]["tag"] == "t"


def test_rank_logger_writes_json_lines_and_nothing_without_a_log_dir(tmp_path: Path) -> None:
    rank_logger(5).info("session.transition", request_id="r1")
    assert not list(tmp_path.iterdir())
    configure_logging(tmp_path)
    try:
        rank_logger(5).info("session.transition", request_id="r1", peer=2)
    finally:
        configure_logging(None)
    (line,) = read_log(tmp_path, 5)
    assert list(line) == ["ts", "rank", "event", "level", "request_id", "peer"]
    assert (line["rank"], line["event"], line["level"]) == (5, "session.transition", "info")


def test_local_group_logs_under_its_world_offset(log_dir: Path) -> None:
    comms = local_group(2, "decode", timeout=10, first_log_rank=2)
    comms[1].dump()
    assert [x["rank"] for x in read_log(log_dir, 3)] == [3]
    assert not (log_dir / "rank-1.jsonl").exists()


def test_watchdog_dumps_a_collective_nobody_polls(log_dir: Path) -> None:
    comms = local_group(2, "wd", timeout=0.05)
    handle = comms[0].iallgather(1)  # never tested: its owner is "stuck"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        path = log_dir / "rank-0.jsonl"
        if path.exists() and "watchdog" in path.read_text():
            break
        time.sleep(0.02)
    dumps = [x for x in read_log(log_dir, 0) if x["event"] == "flight_recorder.dump"]
    assert dumps[0]["reason"] == "watchdog" and dumps[0]["comm"] == "wd"
    assert dumps[0]["entries"][0]["state"] == "pending" and dumps[0]["entries"][0]["end"] is None
    assert handle.done is False


def test_sigusr1_dumps_every_live_communicator(log_dir: Path) -> None:
    comms = local_group(2, "sig", timeout=10)
    assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)
    os.kill(os.getpid(), signal.SIGUSR1)
    path = log_dir / "rank-1.jsonl"

    def signal_dumps() -> list[dict[str, Any]]:
        # Complete lines only: the watchdog thread may be writing the dump of another live
        # communicator (an earlier test's) while this one reads; wait for this comm's own.
        lines = path.read_text().split("\n")[:-1] if path.exists() else []
        return [x for x in map(json.loads, lines) if x["event"] == "flight_recorder.dump"
                and x["reason"] == "signal" and x["comm"] == "sig"]

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not signal_dumps():
        time.sleep(0.02)
    assert signal_dumps()
    assert comms[1].dump() == []


# -- package surface -------------------------------------------------------------------------


def test_collectives_all_matches_exports() -> None:
    public = {name for name in vars(coll) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(coll, name)).__name__ == "module"}
    assert set(coll.__all__) == public - modules - {"annotations"}
    assert len(coll.__all__) == len(set(coll.__all__))


def test_importing_collectives_does_not_import_mpi4py() -> None:
    import subprocess
    import sys

    code = ("import sys, kvhandoff.collectives as c; c.simulate_ranks(2, lambda x: x.barrier());"
            "print('mpi4py' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
