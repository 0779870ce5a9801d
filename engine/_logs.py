"""Reading kvhandoff's per-rank logs: ``<log_dir>/rank-<N>.jsonl``, one JSON object a line.

The keys are the contract of docs/log-schema.md. This module only reads and types them; what
they mean is worked out in ``_diagnosis``. It is tolerant on purpose, because the logs it reads
come from jobs that crashed or hung: a rank file that is absent or unreadable, a last line cut
off by a kill, a line that is not JSON or does not follow the schema are each recorded as an
``InputNote`` and reading goes on. Only a directory that cannot be listed, or one that holds no
readable rank file at all, raises ``LogDirError``.

Speed: a file is decoded in one call (``msgspec`` ``decode_lines`` into a typed struct, keys
the analyzer does not know are skipped by the decoder). Only a file that fails as a whole is
re-read in chunks, and only a chunk that fails is decoded line by line, so one bad line costs
a chunk, not the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs
import msgspec

__all__ = [
    "InputNote",
    "LogDirError",
    "LogLine",
    "LogSet",
    "Position",
    "RankLog",
    "RecorderEntry",
    "load_logs",
    "read_rank_log",
]

RANK_FILE = re.compile(r"rank-(\d+)\.jsonl")

# Lines re-decoded together after a file failed as a whole; a failing chunk is then decoded
# line by line to find the culprit(s).
_CHUNK_LINES = 4096

# Kinds of InputNote.
MISSING_FILE = "missing_file"
UNREADABLE_FILE = "unreadable_file"
EMPTY_FILE = "empty_file"
TRUNCATED_LINE = "truncated_line"
BAD_LINE = "bad_line"
RANK_MISMATCH = "rank_mismatch"


class LogDirError(Exception):
    """The log directory cannot be analyzed at all: it does not exist, cannot be listed, or
    holds no readable ``rank-<N>.jsonl`` file. ``path`` is the directory, ``reason`` says which.
    (``kvhandoff analyze`` exits 2 on it.)"""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"cannot analyze {path}: {reason}; pass the directory that holds the "
            f"rank-<N>.jsonl files written by kvhandoff's logging"
        )
        self.path = path
        self.reason = reason


class Position(msgspec.Struct, frozen=True, gc=False):
    """Where a rank was on one communicator, as another rank reported it (the values of
    ``collective.timeout``'s ``positions`` and ``collective.desync``'s ``ranks``). Every key
    is optional: a peer reports what it knows."""

    seq: int | None = None
    op: str | None = None
    site: str | None = None
    tag: str | None = None
    state: str | None = None
    root: int | None = None
    reduce_op: str | None = None


class RecorderEntry(msgspec.Struct, frozen=True, gc=False):
    """One collective in a ``flight_recorder.dump`` (``end`` is None while pending)."""

    seq: int
    op: str
    site: str = ""
    tag: str | None = None
    summary: str | None = None
    start: float | None = None
    end: float | None = None
    state: str = "pending"


class LogLine(msgspec.Struct, frozen=True, gc=False):
    """One log line. ``ts``, ``rank`` and ``event`` are required; every other key of the
    schema is optional and None when the line's event does not carry it. Keys outside the
    schema are ignored (additions to the log are fine)."""

    ts: float
    rank: int
    event: str
    level: str = "info"
    # collectives
    comm: str | None = None
    seq: int | None = None
    op: str | None = None
    site: str | None = None
    tag: str | None = None
    root: int | None = None
    reduce_op: str | None = None
    summary: str | None = None
    duration_s: float | None = None
    state: str | None = None
    ranks: dict[str, Position] | None = None
    mismatched_ranks: list[int] | None = None
    deadline_s: float | None = None
    arrived: list[int] | None = None
    missing: list[int] | None = None
    positions: dict[str, Position] | None = None
    reason: str | None = None
    entries: list[RecorderEntry] | None = None
    # engine
    request_id: str | None = None
    role: str | None = None
    peer: int | None = None
    from_state: str | None = None
    to_state: str | None = None
    trigger: str | None = None
    result: str | None = None
    safe_to_free: bool | None = None
    healthy: bool | None = None
    quarantined: int | None = None
    quarantine_budget: int | None = None
    seconds_since_progress: float | None = None
    in_flight: int | None = None
    restart_requested: bool | None = None
    block_ids: list[int] | None = None
    owner: str | None = None
    phase: str | None = None


_LINE_DECODER = msgspec.json.Decoder(LogLine)


@attrs.frozen
class InputNote:
    """Something about the input that the reader tolerated. ``kind`` is one of
    ``missing_file``, ``unreadable_file``, ``empty_file``, ``truncated_line``, ``bad_line``,
    ``rank_mismatch``; ``line`` is 1-based where one line is concerned."""

    kind: str
    path: str
    rank: int | None
    detail: str
    line: int | None = None


@attrs.frozen
class RankLog:
    """The decoded lines of one rank's file, in file order, and what was wrong with it."""

    rank: int
    path: str
    lines: Sequence[LogLine]
    notes: tuple[InputNote, ...] = ()


@attrs.frozen
class LogSet:
    """Every readable rank file of one log directory. ``ranks`` maps rank -> its log;
    ``notes`` holds the notes of every file, and the files that could not be read."""

    log_dir: str
    ranks: dict[int, RankLog]
    notes: tuple[InputNote, ...] = ()

    @property
    def event_count(self) -> int:
        """Number of decoded lines over all ranks."""
        return sum(len(rank_log.lines) for rank_log in self.ranks.values())

    def rank_lines(self) -> Iterable[tuple[int, LogLine]]:
        """Every line as (rank of its file, line), rank by rank."""
        for rank in sorted(self.ranks):
            for line in self.ranks[rank].lines:
                yield rank, line


def _decode_tolerant(data: bytes, path: str, rank: int) -> tuple[list[LogLine], list[InputNote]]:
    """Decode what can be decoded; one note per line that cannot."""
    raw_lines = data.split(b"\n")
    ends_cleanly = data.endswith(b"\n")
    last_index = len(raw_lines) - 1
    lines: list[LogLine] = []
    notes: list[InputNote] = []
    for chunk_start in range(0, len(raw_lines), _CHUNK_LINES):
        chunk = raw_lines[chunk_start : chunk_start + _CHUNK_LINES]
        try:
            lines.extend(_LINE_DECODER.decode_lines(b"\n".join(chunk)))
            continue
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass
        for offset, raw in enumerate(chunk):
            if not raw.strip():
                continue
            index = chunk_start + offset
            try:
                lines.append(_LINE_DECODER.decode(raw))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                truncated = index == last_index and not ends_cleanly
                notes.append(
                    InputNote(
                        kind=TRUNCATED_LINE if truncated else BAD_LINE,
                        path=path,
                        rank=rank,
                        line=index + 1,
                        detail=(
                            "last line cut off (the process probably died while writing it)"
                            if truncated
                            else f"skipped: {exc}; {_excerpt(raw)}"
                        ),
                    )
                )
    return lines, notes


def _excerpt(raw: bytes, limit: int = 60) -> str:
    text = raw[:limit].decode("utf-8", errors="replace")
    return repr(text + ("..." if len(raw) > limit else ""))


def read_rank_log(path: str | os.PathLike[str], rank: int) -> RankLog:
    """Decode one rank file. Raises ``OSError`` if it cannot be read; never raises for its
    content (bad lines become notes)."""
    path_str = os.fspath(path)
    with open(path_str, "rb") as file:
        data = file.read()
    notes: list[InputNote] = []
    try:
        lines: list[LogLine] = _LINE_DECODER.decode_lines(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        lines, notes = _decode_tolerant(data, path_str, rank)
    if not lines and not notes:
        notes.append(InputNote(EMPTY_FILE, path_str, rank, "the file holds no log line"))
    # Lines are attributed to the file's rank; a line that says otherwise is worth knowing
    # about (two ranks writing one file, or a mislabelled file) but is not dropped.
    foreign = sum(1 for line in lines if line.rank != rank)
    if foreign:
        notes.append(
            InputNote(
                RANK_MISMATCH,
                path_str,
                rank,
                f"{foreign} line(s) carry a rank other than {rank}; counted as rank {rank}",
            )
        )
    return RankLog(rank=rank, path=path_str, lines=lines, notes=tuple(notes))


def rank_files(log_dir: str | os.PathLike[str]) -> dict[int, Path]:
    """The ``rank-<N>.jsonl`` files of a directory, by rank. Raises ``LogDirError`` when the
    directory cannot be listed."""
    directory = Path(log_dir)
    if not directory.exists():
        raise LogDirError(str(directory), "no such directory")
    if not directory.is_dir():
        raise LogDirError(str(directory), "not a directory")
    try:
        names = os.listdir(directory)
    except OSError as exc:
        raise LogDirError(str(directory), f"cannot list it ({exc.strerror})") from None
    found: dict[int, Path] = {}
    for name in names:
        match = RANK_FILE.fullmatch(name)
        if match is not None:
            found[int(match.group(1))] = directory / name
    return found


def load_logs(log_dir: str | os.PathLike[str]) -> LogSet:
    """Read every ``rank-<N>.jsonl`` of ``log_dir``. Files that cannot be read become notes;
    raises ``LogDirError`` if the directory cannot be listed or no rank file can be read."""
    files = rank_files(log_dir)
    if not files:
        raise LogDirError(os.fspath(log_dir), "it holds no rank-<N>.jsonl file")
    ranks: dict[int, RankLog] = {}
    notes: list[InputNote] = []
    for rank in sorted(files):
        path = files[rank]
        try:
            rank_log = read_rank_log(path, rank)
        except OSError as exc:
            notes.append(
                InputNote(UNREADABLE_FILE, str(path), rank, f"cannot read it ({exc.strerror})")
            )
            continue
        ranks[rank] = rank_log
        notes.extend(rank_log.notes)
    if not ranks:
        raise LogDirError(os.fspath(log_dir), "none of its rank-<N>.jsonl files can be read")
    return LogSet(log_dir=os.fspath(log_dir), ranks=ranks, notes=tuple(notes))
