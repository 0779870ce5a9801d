"""What went wrong in a run, worked out from its per-rank logs (``kvhandoff analyze``).

Theory of operation. Each rank's log (docs/log-schema.md) is first reduced on its own to a
``RankDigest`` (``_digest``: its calls per communicator as arrays indexed by sequence number,
merged from every source by ``_merge``, and its session findings) - in parallel worker
processes for big inputs - and then five questions are answered across ranks, each from
every source that can answer it:

- *Divergence* - the first sequence number, per communicator, at which ranks issued different
  collectives. Sources: ``collective.desync`` lines (the table of fingerprints a rank saw),
  and each rank's own record of its calls (``collective.enter`` / ``collective.exit`` lines,
  flight-recorder dump entries) compared across ranks at equal sequence numbers. Two calls
  match when op and call site agree, the tag standing in for the site when one is given
  (the fingerprint of DESIGN.md, without root / reduce op, which only the desync table has).
- *Hangs* - ranks that entered a collective and never left it: ``collective.timeout`` lines
  (the reporter and the ``arrived`` ranks are stuck, ``missing`` never came), exits in state
  ``timeout``, dump entries still ``pending`` / ``timeout`` with nothing after them, and a last
  ``collective.enter`` without its exit. For each, where every rank of the world was at that
  time: its own last call at or before it, else the position a peer reported, and a plain
  statement when a rank has no log at all.
- *Sessions* - transfers whose last transition is not terminal, failures, quarantines,
  cancels with their results, blocks whose deferred free was never released, and on request
  one request's timeline across ranks.
- *Health* - every ``health.change``; a broken TP group (``engine.tp_failed``: its error and
  the ranks that logged it); and the engine's warnings (``control.rejected``,
  ``control.send_failed``, ``engine.drain_left``, ``engine.group_incomplete``) counted, with
  the first few of each.
- *Host* - what a host's own code did wrong, from its lines (``host.*``): a loop its
  watchdog found stuck inside one call (``host.stalled``: the rank, the call, the site where
  its thread was), blocks it freed while a transport operation on them was still pending
  (``host.free``), and a late write the pool's poison check caught in freed blocks
  (``host.poisoned``), tied to the early frees that gave those blocks back.

Injected faults (``fault.injected``) explain findings without being problems: the
quarantines and failures of the requests they hit, and an engine's unhealthy spell that
only those quarantines caused and that recovered before the log ends. Those go to
``Report.expected``; anything else they touch (a restart, blocks never released, a session
never finished, a host's own mistake) is still a problem.

``Report.problems`` lists one line per finding; an empty tuple means the run was clean.
Input notes (bad or truncated lines) are reported but are not problems by themselves.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import attrs
import numpy as np
from kvhandoff.analysis._digest import (
    ENGINE_WARNINGS,
    EXAMPLES,
    RankDigest,
    default_workers,
    digest_files,
    digest_rank,
)
from kvhandoff.analysis._merge import (
    PENDING,
    STATE_FROM_DUMP,
    STATE_FROM_EXIT,
    TIMEOUT,
    CallLog,
)
from kvhandoff.analysis._reader import (
    MISSING_FILE,
    UNREADABLE_FILE,
    InputNote,
    Line,
    LogSet,
    Position,
    rank_files,
)
from kvhandoff.analysis._report import (
    CallPosition,
    Divergence,
    EarlyFree,
    EventTally,
    Fingerprint,
    Hang,
    HealthChange,
    InjectedFault,
    LateWrite,
    Quarantine,
    Report,
    Stall,
    Whereabouts,
)
from kvhandoff.analysis.errors import LogDirError

__all__ = ["NO_LOG_NOTE", "PARALLEL_MIN_BYTES", "analyze", "analyze_logs"]

NO_LOG_NOTE = "no log file - it may have died before logging"
# sessions.QUARANTINE_BUDGET_EXCEEDED (the analyzer never imports the runtime).
QUARANTINE_BUDGET_EXCEEDED = "quarantine_budget_exceeded"
# Below this much log data, starting worker processes costs more than it saves.
PARALLEL_MIN_BYTES = 32 * 1024 * 1024


def _int_key(key: str) -> int | None:
    return int(key) if key.lstrip("-").isdigit() else None


def _from_peer(rank: int, position: Position, source: str) -> CallPosition:
    """A position or a fingerprint (which has no state) that a peer reported."""
    state = getattr(position, "state", None)
    return CallPosition(
        rank, position.seq, position.op, position.site, position.tag, state, None, source
    )


# --------------------------------------------------------------------------- divergence


def _expected(positions: Iterable[CallPosition]) -> tuple[Fingerprint, CallPosition]:
    """The majority fingerprint; a tie goes to the group holding the lowest rank."""
    ordered = sorted(positions, key=lambda position: position.rank)
    counts = Counter(position.fingerprint() for position in ordered)
    best = max(counts.values())
    example = next(p for p in ordered if counts[p.fingerprint()] == best)
    return example.fingerprint(), example


def _first_mismatch(logs: dict[int, CallLog]) -> int | None:
    """The lowest seq at which two ranks' own records name different calls."""
    if len(logs) < 2:
        return None
    keys: dict[tuple[str | None, str | None], int] = {}
    seqs, fingerprints = [], []
    for log in logs.values():
        local = np.array(
            [keys.setdefault(key, len(keys)) for key in log.fingerprint_keys()], dtype=np.int64
        )
        seqs.append(log.seqs)
        fingerprints.append(local[log.call])
    all_seqs, all_fps = np.concatenate(seqs), np.concatenate(fingerprints)
    order = np.lexsort((all_fps, all_seqs))
    all_seqs, all_fps = all_seqs[order], all_fps[order]
    differs = (all_seqs[1:] == all_seqs[:-1]) & (all_fps[1:] != all_fps[:-1])
    bad = all_seqs[1:][differs]
    return int(bad[0]) if len(bad) else None


def _divergences(digests: dict[int, RankDigest], world: list[int]) -> list[Divergence]:
    reports: defaultdict[tuple[str, int], list[tuple[int, Line]]] = defaultdict(list)
    for rank, digest in digests.items():
        for line in digest.desyncs:
            reports[(line.comm or "", line.seq)].append((rank, line))
    comms = {comm for digest in digests.values() for comm in digest.calls}
    comms |= {comm for comm, _ in reports}
    found: list[Divergence] = []
    for comm in sorted(comms):
        first_bad = _first_mismatch(
            {rank: d.calls[comm] for rank, d in digests.items() if comm in d.calls}
        )
        reported = min((seq for (c, seq) in reports if c == comm), default=None)
        candidates = [seq for seq in (first_bad, reported) if seq is not None]
        if candidates:
            seq = min(candidates)
            found.append(_divergence_at(comm, seq, digests, world, reports.get((comm, seq), [])))
    found.sort(key=lambda divergence: (divergence.ts is None, divergence.ts or 0.0))
    return found


def _divergence_at(
    comm: str,
    seq: int,
    digests: dict[int, RankDigest],
    world: list[int],
    reports: list[tuple[int, Line]],
) -> Divergence:
    positions: dict[int, CallPosition] = {}
    # What the reporters compared is the best evidence of who was where.
    for reporter, line in sorted(reports, key=lambda report: report[0]):
        for key, position in (line.ranks or {}).items():
            rank = _int_key(key)
            if rank is not None and rank not in positions:
                positions[rank] = _from_peer(rank, position, f"collective.desync (rank {reporter})")
    for rank, digest in digests.items():
        log = digest.calls.get(comm)
        own = log.position_of(rank, seq) if log is not None else None
        if own is None:
            continue
        reported = positions.get(rank)
        if reported is None:
            positions[rank] = own
        elif reported.fingerprint() == own.fingerprint():
            # Same call: the rank's own record adds what the peer could not know.
            positions[rank] = attrs.evolve(reported, state=own.state, ts=own.ts)
    expected_fp, example = _expected(positions.values())
    mismatched = {rank for rank, pos in positions.items() if pos.fingerprint() != expected_fp}
    if not mismatched:
        # The reporters saw a difference our fingerprint does not show (root / reduce op).
        for _, line in reports:
            mismatched.update(line.mismatched_ranks or ())
    times = [line.ts for _, line in reports]
    times += [pos.ts for pos in positions.values() if pos.ts is not None]
    return Divergence(
        comm=comm,
        seq=seq,
        expected_op=example.op,
        expected_site=example.site,
        expected_tag=example.tag,
        positions=tuple(positions[rank] for rank in sorted(positions)),
        mismatched_ranks=tuple(sorted(mismatched)),
        absent_ranks=tuple(rank for rank in world if rank not in positions),
        reported_by=tuple(sorted({reporter for reporter, _ in reports})),
        ts=min(times) if times else None,
    )


# --------------------------------------------------------------------------- hangs


@attrs.define
class _HangEvidence:
    stuck: set[int] = attrs.Factory(set)
    missing: set[int] = attrs.Factory(set)
    timeout_times: list[float] = attrs.Factory(list)
    dump_times: list[float] = attrs.Factory(list)
    evidence: list[str] = attrs.Factory(list)
    # rank -> (position as a peer reported it, reporter)
    reported: dict[int, tuple[Position, int]] = attrs.Factory(dict)
    call: tuple[str | None, str | None, str | None] | None = None


def _hangs(
    digests: dict[int, RankDigest], world: list[int], absent: set[int], unreadable: set[int]
) -> list[Hang]:
    groups: defaultdict[tuple[str, int], _HangEvidence] = defaultdict(_HangEvidence)
    for rank, digest in sorted(digests.items()):
        for line in digest.timeouts:
            group = groups[(line.comm or "", line.seq)]
            group.stuck.add(rank)
            group.stuck.update(line.arrived or ())
            group.missing.update(line.missing or ())
            group.timeout_times.append(line.ts)
            group.evidence.append(f"collective.timeout logged by rank {rank}")
            group.call = group.call or (line.op, line.site, line.tag)
            for key, position in (line.positions or {}).items():
                peer = _int_key(key)
                if peer is not None:
                    group.reported.setdefault(peer, (position, rank))
        for comm, log in digest.calls.items():
            _own_stuck_calls(rank, comm, log, groups)
    hangs = []
    for (comm, seq), group in groups.items():
        group.missing -= group.stuck
        if group.timeout_times:
            at = min(group.timeout_times)
        elif group.dump_times:
            at = min(group.dump_times)
        else:
            at = max(digests[rank].last_ts or 0.0 for rank in group.stuck if rank in digests)
        op, site, tag = group.call or (None, None, None)
        whereabouts = tuple(
            _whereabouts(rank, comm, seq, at, group, digests, absent, unreadable) for rank in world
        )
        hangs.append(
            Hang(
                comm=comm,
                seq=seq,
                op=op,
                site=site,
                tag=tag,
                stuck_ranks=tuple(sorted(group.stuck)),
                missing_ranks=tuple(sorted(group.missing)),
                at=at,
                evidence=tuple(dict.fromkeys(group.evidence)),
                whereabouts=whereabouts,
            )
        )
    hangs.sort(key=lambda hang: (hang.at, hang.comm, hang.seq))
    return hangs


def _own_stuck_calls(
    rank: int, comm: str, log: CallLog, groups: defaultdict[tuple[str, int], _HangEvidence]
) -> None:
    """Calls this rank's own records show it inside of and never out of: any call that ended
    in ``timeout``, and a last call still ``pending`` (entered with no exit, or pending in a
    dump). A pending call with later calls after it was only momentarily inside."""
    rows = []
    if TIMEOUT in log.states:
        rows = [int(row) for row in np.flatnonzero(log.state == log.states.index(TIMEOUT))]
    last = log.last_row
    if log.states[int(log.state[last])] == PENDING and last not in rows:
        rows.append(last)
    for row in rows:
        seq = int(log.seqs[row])
        group = groups[(comm, seq)]
        group.stuck.add(rank)
        state = log.states[int(log.state[row])]
        if log.state_from[row] == STATE_FROM_EXIT:
            group.evidence.append(f"rank {rank} left it with state {state}")
        elif log.state_from[row] == STATE_FROM_DUMP:
            group.evidence.append(f"flight recorder of rank {rank}: {state}")
            group.dump_times.append(float(log.dumped_at[row]))
        else:
            group.evidence.append(f"rank {rank} entered it and its log has no exit")
        op, site, tag = log.calls[int(log.call[row])]
        group.call = group.call or (op, site, tag)


def _whereabouts(
    rank: int,
    comm: str,
    seq: int,
    at: float,
    group: _HangEvidence,
    digests: dict[int, RankDigest],
    absent: set[int],
    unreadable: set[int],
) -> Whereabouts:
    reported = group.reported.get(rank)
    peer_position, seen_by = None, ""
    if reported is not None:
        peer_position = _from_peer(rank, reported[0], f"collective.timeout (rank {reported[1]})")
        seen_by = f"position as rank {reported[1]} saw it"
    if rank in absent or rank in unreadable:
        why = NO_LOG_NOTE if rank in absent else "log file unreadable"
        return Whereabouts(rank, peer_position, f"{why}; {seen_by}" if seen_by else why)
    log = digests[rank].calls.get(comm) if rank in digests else None
    if rank in group.stuck:
        own = log.position_of(rank, seq) if log is not None else None
        return Whereabouts(rank, own or peer_position, "stuck in this collective")
    own = log.last_position_at(rank, at) if log is not None else None
    if own is not None:
        return Whereabouts(rank, own, _relative(own, seq))
    if peer_position is not None:
        return Whereabouts(rank, peer_position, seen_by)
    return Whereabouts(
        rank, None, f"its log has no call on {comm!r} up to then (per-call logging off, no dump)"
    )


def _relative(position: CallPosition, seq: int) -> str:
    if position.seq is None:
        return ""
    if position.seq < seq:
        return f"behind: {seq - position.seq} call(s) before this one"
    if position.seq > seq:
        return f"ahead: {position.seq - seq} call(s) past this one"
    return "at this sequence number"


# --------------------------------------------------------------------------- host


def _host_findings(
    digests: list[RankDigest],
) -> tuple[list[Stall], list[EarlyFree], list[LateWrite], list[InjectedFault]]:
    stalls: list[Stall] = []
    early: list[EarlyFree] = []
    late: list[LateWrite] = []
    injected: list[InjectedFault] = []
    for digest in digests:
        rank = digest.rank
        freed_early: dict[int, str] = {}  # block -> the request that freed it early, last
        for line in digest.host:
            if line.event == "fault.injected":
                injected.append(InjectedFault(rank, line.ts, line.request_id, line.fault or "",
                                              line.peer, line.detail or ""))
            elif line.event == "host.stalled":
                stalls.append(Stall(rank, line.ts, line.request_id, line.call or "",
                                    line.site or "", line.bound_s))
            elif line.event == "host.free" and line.pending:
                block_ids = tuple(line.block_ids or ())
                early.append(EarlyFree(rank, line.ts, line.request_id or "", block_ids))
                freed_early.update(dict.fromkeys(block_ids, line.request_id or ""))
            elif line.event == "host.poisoned":
                block_ids = tuple(line.block_ids or ())
                freed_by = sorted({freed_early[b] for b in block_ids if b in freed_early})
                late.append(LateWrite(rank, line.ts, block_ids, tuple(freed_by),
                                      line.error or ""))
    return stalls, early, late, injected


def _host_problems(
    stalls: list[Stall], early: list[EarlyFree], late: list[LateWrite]
) -> list[str]:
    problems = []
    for stall in stalls:
        bound = f" {stall.bound_s:g} s" if stall.bound_s is not None else ""
        problems.append(
            f"rank {stall.rank}: host loop stalled in {stall.call} at {stall.site} (still "
            f"inside it after the{bound} watchdog bound)"
        )
    for free in early:
        problems.append(
            f"rank {free.rank}: blocks {list(free.block_ids)} of {free.request_id} freed while "
            "its transfer was still pending (the transport may still read or write them)"
        )
    for write in late:
        problem = (
            f"rank {write.rank}: late write into freed blocks {list(write.block_ids)}, caught "
            "by the pool's poison check"
        )
        if write.freed_by:
            problem += f" (freed early by {', '.join(write.freed_by)})"
        problems.append(problem)
    return problems


def _explained_unhealthy(
    rank: int, health: list[HealthChange], quarantines: list[Quarantine], injected: set[str]
) -> bool:
    """An unhealthy spell of ``rank`` that an injected fault explains: every unhealthy
    snapshot was over the quarantine budget, every quarantine there was of a request with an
    injected fault, and the engine was healthy again by the end of its log."""
    changes = [change for change in health if change.rank == rank]
    mine = [q for q in quarantines if q.rank == rank]
    return (
        bool(changes) and changes[-1].healthy is True and bool(mine)
        and all(q.request_id in injected for q in mine)
        and all(change.reason == QUARANTINE_BUDGET_EXCEEDED
                for change in changes if change.healthy is False)
    )


def _split(items: list[Any], injected: set[str]) -> tuple[list[Any], list[Any]]:
    """(those whose request has no injected fault, those whose request has one)."""
    return ([item for item in items if item.request_id not in injected],
            [item for item in items if item.request_id in injected])


def _requests_text(items: Iterable[Any]) -> str:
    return ", ".join(dict.fromkeys(item.request_id for item in items))


# --------------------------------------------------------------------------- report


def _ranks_text(ranks: Iterable[int]) -> str:
    return ", ".join(str(rank) for rank in ranks) or "none"


# The problem line of each of _digest.ENGINE_WARNINGS.
_WARNING_PROBLEMS = {
    "control.rejected": "{count} control message(s) rejected, on rank(s) {ranks}",
    "control.send_failed": "{count} control message(s) could not be sent, on rank(s) {ranks}",
    "engine.drain_left": "a drain ended with transfers still open, on rank(s) {ranks}",
    "engine.group_incomplete": (
        "{count} request(s) released without the TP group's agreement, on rank(s) {ranks}"
    ),
}


def _tallies(digests: list[RankDigest]) -> list[EventTally]:
    """One tally per engine warning that some rank logged, in ``ENGINE_WARNINGS`` order."""
    tallies = []
    for event in ENGINE_WARNINGS:
        found = [(d.rank, d.warnings[event]) for d in digests if event in d.warnings]
        if not found:
            continue
        examples = sorted(
            (example for _, (_, first) in found for example in first),
            key=lambda example: (example.ts, example.rank),
        )
        tallies.append(EventTally(
            event=event,
            count=sum(count for _, (count, _) in found),
            ranks=tuple(rank for rank, _ in found),
            examples=tuple(examples[:EXAMPLES]),
        ))
    return tallies


def analyze(
    logs: LogSet, *, request_id: str | None = None, comm: str | None = None
) -> Report:
    """Work out what went wrong in the run whose decoded logs are ``logs``. ``request_id``
    adds that request's cross-rank timeline; ``comm`` restricts the collective findings to
    one communicator. Never raises for the content of the logs."""
    digests = [
        digest_rank(log, request_id=request_id, comm=comm) for _, log in sorted(logs.ranks.items())
    ]
    unreadable = [note for note in logs.notes if note.kind == UNREADABLE_FILE]
    return _report(logs.log_dir, digests, unreadable, request_id)


def analyze_logs(
    log_dir: str | os.PathLike[str],
    *,
    request_id: str | None = None,
    comm: str | None = None,
    workers: int | None = None,
) -> Report:
    """Read and analyze ``log_dir`` (see ``analyze``). Rank files are digested in ``workers``
    processes; None picks one per CPU when the logs are big (``PARALLEL_MIN_BYTES``), else
    none. Raises ``LogDirError`` when the directory cannot be listed or no rank file read."""
    files = {rank: str(path) for rank, path in rank_files(log_dir).items()}
    if not files:
        raise LogDirError(os.fspath(log_dir), "it holds no rank-<N>.jsonl file")
    if workers is None:
        workers = default_workers(list(files.values()), PARALLEL_MIN_BYTES)
    results = digest_files(files, request_id=request_id, comm=comm, workers=workers)
    digests = [result for result in results if isinstance(result, RankDigest)]
    unreadable = [result for result in results if isinstance(result, InputNote)]
    if not digests:
        raise LogDirError(os.fspath(log_dir), "none of its rank-<N>.jsonl files can be read")
    return _report(os.fspath(log_dir), digests, unreadable, request_id)


def _report(
    log_dir: str,
    digest_list: list[RankDigest],
    unreadable_notes: list[InputNote],
    request_id: str | None,
) -> Report:
    digests = {digest.rank: digest for digest in digest_list}
    unreadable = {note.rank for note in unreadable_notes if note.rank is not None}
    # The world: ranks 0..max over every rank that has a file or that a peer's line names.
    named = set(digests) | unreadable
    for digest in digests.values():
        named |= digest.named_ranks
    named = {rank for rank in named if rank >= 0}
    world = list(range(max(named) + 1)) if named else []
    absent = {rank for rank in world if rank not in digests and rank not in unreadable}

    notes: list[InputNote] = []
    for rank in sorted(set(digests) | unreadable | absent):
        if rank in digests:
            notes.extend(digests[rank].notes)
        elif rank in absent:
            notes.append(
                InputNote(MISSING_FILE, f"{log_dir}/rank-{rank}.jsonl", rank, NO_LOG_NOTE)
            )
    notes.extend(unreadable_notes)

    divergences = _divergences(digests, world)
    hangs = _hangs(digests, world, absent, unreadable)
    ordered = [digests[rank] for rank in sorted(digests)]
    unfinished = [outcome for d in ordered for outcome in d.unfinished]
    failed = [outcome for d in ordered for outcome in d.failed]
    quarantines = [quarantine for d in ordered for quarantine in d.quarantines]
    cancels = [cancel for d in ordered for cancel in d.cancels]
    pinned = [pin for d in ordered for pin in d.pinned]
    health = sorted(
        (change for d in ordered for change in d.health), key=lambda c: (c.ts, c.rank)
    )
    timeline = sorted(
        (entry for d in ordered for entry in d.timeline), key=lambda e: (e.ts, e.rank)
    )

    problems: list[str] = []
    for divergence in divergences:
        problems.append(
            f"collective desync on {divergence.comm!r} at seq {divergence.seq}: "
            f"rank(s) {_ranks_text(divergence.mismatched_ranks)} differ from the others"
        )
    for hang in hangs:
        problem = (
            f"hang on {hang.comm!r} at seq {hang.seq} ({hang.op}): rank(s) "
            f"{_ranks_text(hang.stuck_ranks)} never left it"
        )
        if hang.missing_ranks:
            problem += f"; rank(s) {_ranks_text(hang.missing_ranks)} never arrived"
        problems.append(problem)
    problems.extend(f"rank {rank}: {NO_LOG_NOTE}" for rank in sorted(absent))
    problems.extend(f"rank {rank}: log file unreadable" for rank in sorted(unreadable))
    stalls, early_frees, late_writes, injected = _host_findings(ordered)
    problems.extend(_host_problems(stalls, early_frees, late_writes))
    injected_ids = {fault.request_id for fault in injected if fault.request_id is not None}
    expected = [
        f"fault injected on rank {fault.rank}: {fault.fault}"
        + (f" {fault.request_id}" if fault.request_id is not None else "")
        + (f" (peer {fault.peer})" if fault.peer is not None else "")
        + (f": {fault.detail}" if fault.detail else "")
        for fault in injected
    ]
    if unfinished:
        problems.append(f"{len(unfinished)} session(s) never reached a terminal state")
    failed_real, failed_injected = _split(failed, injected_ids)
    if failed_real:
        problems.append(f"{len(failed_real)} session(s) failed")
    if failed_injected:
        expected.append(f"{len(failed_injected)} session(s) failed, of the injected fault's "
                        f"request(s) {_requests_text(failed_injected)}")
    quarantines_real, quarantines_injected = _split(quarantines, injected_ids)
    if quarantines_real:
        problems.append(f"{len(quarantines_real)} quarantine(s)")
    if quarantines_injected:
        expected.append(f"{len(quarantines_injected)} quarantine(s), of the injected fault's "
                        f"request(s) {_requests_text(quarantines_injected)}")
    if pinned:
        problems.append(f"{len(pinned)} deferred free(s) never released")
    unhealthy = sorted({change.rank for change in health if change.healthy is False})
    recovered = [rank for rank in unhealthy
                 if _explained_unhealthy(rank, health, quarantines, injected_ids)]
    if len(recovered) < len(unhealthy):
        problems.append("engine unhealthy on rank(s) "
                        f"{_ranks_text(r for r in unhealthy if r not in recovered)}")
    if recovered:
        expected.append(f"engine unhealthy on rank(s) {_ranks_text(recovered)} over the "
                        "injected fault's quarantines, healthy again by the end")
    restarts = sorted({change.rank for change in health if change.restart_requested})
    if restarts:
        problems.append(f"restart requested on rank(s) {_ranks_text(restarts)}")
    tp_failures = sorted(
        (failure for d in ordered for failure in d.tp_failures), key=lambda f: (f.ts, f.rank)
    )
    if tp_failures:
        broken = sorted({failure.rank for failure in tp_failures})
        problems.append(
            f"TP group broken on rank(s) {_ranks_text(broken)}: {tp_failures[0].error}"
        )
    warnings = _tallies(ordered)
    for tally in warnings:
        problems.append(_WARNING_PROBLEMS[tally.event].format(
            count=tally.count, ranks=_ranks_text(tally.ranks)
        ))

    first = [d.first_ts for d in ordered if d.first_ts is not None]
    last = [d.last_ts for d in ordered if d.last_ts is not None]
    return Report(
        log_dir=log_dir,
        ranks=tuple(sorted(digests)),
        missing_ranks=tuple(sorted(absent | unreadable)),
        event_count=sum(d.event_count for d in ordered),
        first_ts=min(first) if first else None,
        last_ts=max(last) if last else None,
        notes=tuple(notes),
        divergences=tuple(divergences),
        hangs=tuple(hangs),
        unfinished_sessions=tuple(unfinished),
        failed_sessions=tuple(failed),
        quarantines=tuple(quarantines),
        cancels=tuple(cancels),
        pinned_blocks=tuple(pinned),
        health_changes=tuple(health),
        tp_failures=tuple(tp_failures),
        engine_warnings=tuple(warnings),
        stalls=tuple(stalls),
        early_frees=tuple(early_frees),
        late_writes=tuple(late_writes),
        injected_faults=tuple(injected),
        request_id=request_id,
        timeline=tuple(timeline),
        problems=tuple(problems),
        expected=tuple(expected),
    )
