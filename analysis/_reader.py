"""Reading kvhandoff's per-rank logs: ``<log_dir>/rank-<N>.jsonl``, one JSON object a line.

The keys are those of ``kvhandoff.analysis.schema`` (docs/log-schema.md), and the structs
that type them are built from it. This module only reads and types them; what they mean is
worked out in ``_merge``, ``_digest`` and ``_diagnosis``. It is tolerant on purpose, because
the logs it reads come from jobs that crashed or hung: a rank file that is absent or
unreadable, a last line cut off by a kill, a line that is not JSON or does not follow the
schema are each recorded as an ``InputNote`` and reading goes on. Only a directory that cannot
be listed, or one that holds no readable rank file at all, raises ``LogDirError``.

Two typings of a line, which accept exactly the same lines:

- ``LogLine``, one struct with every key of the schema (``read_rank_log``, ``load_logs``);
- per event, a struct with only that event's keys (``read_rank_events``, the analyzer's path;
  ``EVENT_STRUCTS``: ``CollectiveEnterLine``, ``CollectiveExitLine`` ...). A struct is
  decoded, filled in and freed field by field: with 4 to 12 fields instead of 45, a line
  costs about a third less (measured on a log of mostly ``collective.enter`` / ``exit``
  lines). A line these do not take - an event outside the schema, a key outside its event's
  keys - is decoded as a ``LogLine`` instead, so that what is accepted, with what values, and
  every note are the same as with ``LogLine`` alone.

Speed: a file is decoded a chunk (about 1 MiB, cut at a newline) per ``msgspec``
``decode_lines`` call, into typed structs; keys are matched and values checked in msgspec's C
code. A chunk that fails is decoded again with the next typing, and only a chunk that fails
every typing is decoded line by line, so one bad line costs a chunk, not the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from operator import attrgetter, countOf
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import attrs
import msgspec
from kvhandoff.analysis import schema
from kvhandoff.analysis.errors import LogDirError

__all__ = [
    "EVENT_STRUCTS",
    "InputNote",
    "Line",
    "LogLine",
    "LogSet",
    "Position",
    "RankLog",
    "RecorderEntry",
    "load_logs",
    "rank_files",
    "read_rank_events",
    "read_rank_log",
]

RANK_FILE = re.compile(r"rank-(\d+)\.jsonl")

# Bytes decoded per call (then cut at the next newline): big enough that the per-call cost
# vanishes, small enough that a chunk decoded twice (it held a line of another typing) or
# line by line (it held a bad line) costs little.
_CHUNK_BYTES = 1 << 20

# Kinds of InputNote.
MISSING_FILE = "missing_file"
UNREADABLE_FILE = "unreadable_file"
EMPTY_FILE = "empty_file"
TRUNCATED_LINE = "truncated_line"
BAD_LINE = "bad_line"
RANK_MISMATCH = "rank_mismatch"


# --------------------------------------------------------------------------- the typings
#
# Built from the schema (kvhandoff.analysis.schema), never written out by hand: a key added
# there is decoded here. Every key but the required ones (ts, rank, event; seq and op of a
# recorder entry) is optional and None when absent: the logs come from crashed runs.


def _msgspec_type(kind: schema.KeyType) -> Any:
    if isinstance(kind, schema.ListOf):
        return list[_msgspec_type(kind.item)]  # type: ignore[misc]
    if isinstance(kind, schema.RankMap):
        return dict[str, _msgspec_type(kind.value)]  # type: ignore[misc]
    if isinstance(kind, schema.LogObject):
        return _OBJECT_STRUCTS[kind.name]
    return kind


def _fields(keys: Iterable[schema.LogKey]) -> list[tuple[Any, ...]]:
    """msgspec fields of ``keys``, in the schema's (written) order: msgspec looks a key up
    starting after the previous key's field, so in-order keys are found at the first
    comparison."""
    return [
        (key.name, _msgspec_type(key.type))
        if key.required
        else (key.name, _msgspec_type(key.type) | None, None)
        for key in keys
    ]


def _struct_name(name: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[._ ]", name))


def _define(name: str, fields: list[Any], **config: Any) -> type[msgspec.Struct]:
    struct = msgspec.defstruct(
        name, fields, module=__name__, kw_only=True, frozen=True, gc=False, **config
    )
    # Picklable by name: digests with lines in them come back from worker processes.
    globals()[name] = struct
    return struct


_OBJECT_STRUCTS: dict[str, type[msgspec.Struct]] = {}
for _shape in schema.OBJECTS:
    # One at a time: an object's keys may hold the objects defined before it.
    _OBJECT_STRUCTS[_shape.name] = _define(_struct_name(_shape.name), _fields(_shape.keys))
del _shape

_COMMON = {key.name: key for key in schema.COMMON_KEYS}


def _line_keys() -> list[schema.LogKey]:
    """The common keys, then every event key once (a key has one type in every event)."""
    keys = dict(_COMMON)
    for event in schema.EVENTS.values():
        for key in event.keys:
            keys.setdefault(key.name, key)
    return list(keys.values())


_LogLine = _define("LogLine", _fields(_line_keys()))
# ``event`` is the tag that picks the per-event struct, so it is not one of their fields.
_Event = _define(
    "_Event",
    _fields(key for key in schema.COMMON_KEYS if key.name != "event"),
    tag_field="event",
    forbid_unknown_fields=True,
)
EVENT_STRUCTS: dict[str, type[msgspec.Struct]] = {
    event.name: _define(
        _struct_name(event.name) + "Line",
        _fields(event.keys),
        bases=(_Event,),
        tag=event.name,
        # ... but it is an attribute, as on LogLine.
        namespace={"event": event.name},
    )
    for event in schema.EVENTS.values()
}

if TYPE_CHECKING:
    # For the type checker: the common keys are typed; a key of an event or of an object
    # reads as its value or None.

    class _Decoded(msgspec.Struct):
        def __getattr__(self, name: str) -> Any: ...

    class LogLine(_Decoded):
        ts: float
        rank: int
        event: str
        level: str | None

    Line = LogLine
    Position = _Decoded
    RecorderEntry = _Decoded
else:
    LogLine = _LogLine
    # What a RankLog holds: per-event structs where they apply, LogLine for the other lines.
    # Both have the schema's attribute names; an attribute of another event is only on
    # LogLine.
    Line = Union[(LogLine, *EVENT_STRUCTS.values())]
    Position = _OBJECT_STRUCTS[schema.POSITION.name]
    RecorderEntry = _OBJECT_STRUCTS[schema.RECORDER_ENTRY.name]

_LINE_DECODER = msgspec.json.Decoder(LogLine)
_EVENT_DECODER = msgspec.json.Decoder(Union[tuple(EVENT_STRUCTS.values())])  # noqa: UP007
_DecodeErrors = (msgspec.DecodeError, msgspec.ValidationError)


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
    """The decoded lines of one rank's file, in file order, and what was wrong with it: only
    ``LogLine`` structs from ``read_rank_log``, per-event structs where they apply from
    ``read_rank_events``."""

    rank: int
    path: str
    lines: Sequence[Line]
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


def _decode(
    data: bytes, path: str, rank: int, decoders: Sequence[msgspec.json.Decoder[Any]]
) -> tuple[list[Line], list[InputNote]]:
    """Decode every line that one of ``decoders`` (tried in order) takes; one note per line
    that none takes, with the last decoder's error."""
    view = memoryview(data)
    size = len(data)
    # A last line without its newline was probably cut off by a kill: it is decoded on its
    # own, so that it does not send a whole chunk line by line.
    body_end = size if data.endswith(b"\n") else data.rfind(b"\n") + 1
    lines: list[Line] = []
    notes: list[InputNote] = []
    start = 0
    while start < size:
        if start < body_end:
            stop = data.find(b"\n", start + _CHUNK_BYTES, body_end) + 1 or body_end
        else:
            stop = size
        for decoder in decoders:
            try:
                lines.extend(decoder.decode_lines(view[start:stop]))
                break
            except _DecodeErrors:
                continue
        else:
            _decode_each(data, start, stop, path, rank, decoders, lines, notes)
        start = stop
    return lines, notes


def _decode_each(
    data: bytes,
    start: int,
    stop: int,
    path: str,
    rank: int,
    decoders: Sequence[msgspec.json.Decoder[Any]],
    lines: list[Line],
    notes: list[InputNote],
) -> None:
    """Decode ``data[start:stop]`` line by line (a chunk that failed as a whole)."""
    first_index = data.count(b"\n", 0, start)
    raw_lines = data[start:stop].split(b"\n")
    cut_off = stop == len(data) and not data.endswith(b"\n")
    for offset, raw in enumerate(raw_lines):
        if not raw.strip():
            continue
        for decoder in decoders:
            try:
                lines.append(decoder.decode(raw))
                break
            except _DecodeErrors as exc:
                error = exc
        else:
            truncated = cut_off and offset == len(raw_lines) - 1
            notes.append(
                InputNote(
                    kind=TRUNCATED_LINE if truncated else BAD_LINE,
                    path=path,
                    rank=rank,
                    line=first_index + offset + 1,
                    detail=(
                        "last line cut off (the process probably died while writing it)"
                        if truncated
                        else f"skipped: {error}; {_excerpt(raw)}"
                    ),
                )
            )


def _excerpt(raw: bytes, limit: int = 60) -> str:
    text = raw[:limit].decode("utf-8", errors="replace")
    return repr(text + ("..." if len(raw) > limit else ""))


def _read(
    path: str | os.PathLike[str], rank: int, decoders: Sequence[msgspec.json.Decoder[Any]]
) -> tuple[str, list[Line], list[InputNote]]:
    path_str = os.fspath(path)
    with open(path_str, "rb") as file:
        data = file.read()
    lines, notes = _decode(data, path_str, rank, decoders)
    if not lines and not notes:
        notes.append(InputNote(EMPTY_FILE, path_str, rank, "the file holds no log line"))
    # Lines are attributed to the file's rank; a line that says otherwise is worth knowing
    # about (two ranks writing one file, or a mislabelled file) but is not dropped.
    foreign = len(lines) - countOf(map(_RANK, lines), rank)
    if foreign:
        notes.append(
            InputNote(
                RANK_MISMATCH,
                path_str,
                rank,
                f"{foreign} line(s) carry a rank other than {rank}; counted as rank {rank}",
            )
        )
    return path_str, lines, notes


_RANK = attrgetter("rank")


def read_rank_log(path: str | os.PathLike[str], rank: int) -> RankLog:
    """Decode one rank file into ``LogLine``s. Raises ``OSError`` if it cannot be read; never
    raises for its content (bad lines become notes)."""
    path_str, lines, notes = _read(path, rank, (_LINE_DECODER,))
    return RankLog(rank, path_str, lines, tuple(notes))


def read_rank_events(path: str | os.PathLike[str], rank: int) -> RankLog:
    """Decode one rank file as ``read_rank_log`` does - the same lines with the same values,
    the same notes - but into the per-event structs where they apply (faster; see the module
    doc). Each line has ``event`` and the attributes of its event's keys."""
    path_str, lines, notes = _read(path, rank, (_EVENT_DECODER, _LINE_DECODER))
    return RankLog(rank, path_str, lines, tuple(notes))


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
