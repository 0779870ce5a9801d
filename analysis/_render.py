"""The report of ``kvhandoff analyze`` as rich tables: one per finding, then the problems.
``render(report)`` prints to stdout; rich is imported on the first call."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvhandoff.analysis._report import CallPosition, Report
    from rich.console import Console

__all__ = ["render"]


def render(report: Report, console: Console | None = None) -> None:
    """Print ``report`` as tables on ``console`` (stdout when None)."""
    from rich.console import Console

    if console is None:
        probe = Console()
        # Call sites are long; do not wrap them into pieces when writing to a pipe or file.
        console = probe if probe.is_terminal else Console(width=200)
    _Renderer(report, console).render()


class _Renderer:
    def __init__(self, report: Report, console: Console) -> None:
        self.report = report
        self.console = console
        self.t0 = report.first_ts or 0.0

    def when(self, ts: float | None) -> str:
        return "" if ts is None else f"+{ts - self.t0:.3f}s"

    def render(self) -> None:
        from rich.table import Table

        report, console = self.report, self.console
        span = (
            f"{report.last_ts - report.first_ts:.3f}s"
            if report.first_ts is not None and report.last_ts is not None
            else "no time span"
        )
        console.print(f"[bold]kvhandoff analyze[/] {_text(report.log_dir)}", highlight=False)
        present = ", ".join(str(rank) for rank in report.ranks)
        summary = f"ranks with logs: {present}; {report.event_count} events over {span}"
        if report.missing_ranks:
            missing = ", ".join(str(rank) for rank in report.missing_ranks)
            summary += f"; [bold red]no usable log from rank(s) {missing}[/]"
        console.print(summary, highlight=False)

        if report.notes:
            table = Table(title="Input notes", title_justify="left")
            for column in ("rank", "kind", "line", "detail"):
                table.add_column(column)
            for note in report.notes:
                table.add_row(
                    _text(note.rank),
                    note.kind,
                    _text(note.line),
                    _text(f"{note.detail} ({note.path})"),
                )
            console.print(table)
        self.render_divergences()
        self.render_hangs()
        self.render_sessions()
        self.render_timeline()
        self.render_health()
        self.render_engine()
        if report.expected:
            console.print("[bold]Expected (explained by injected faults):[/]")
            for line in report.expected:
                console.print(f"  - {line}", highlight=False, markup=False)
        if report.problems:
            console.print("[bold red]Problems found:[/]")
            for problem in report.problems:
                console.print(f"  - {problem}", highlight=False, markup=False)
        else:
            console.print("[bold green]No problems found.[/]")

    def position_row(self, position: CallPosition | None) -> list[str]:
        if position is None:
            return ["", "", "", "", "", ""]
        return [
            _text(position.seq),
            _text(position.op),
            _text(position.site),
            _text(position.tag),
            _text(position.state),
            _text(position.source),
        ]

    def render_divergences(self) -> None:
        from rich.table import Table

        for divergence in self.report.divergences:
            reporters = (
                f"reported by rank(s) {', '.join(map(str, divergence.reported_by))}"
                if divergence.reported_by
                else "found by comparing the ranks' own records"
            )
            expected = divergence.expected_tag or divergence.expected_site
            table = Table(
                title=(
                    f"Collective desync on {_text(repr(divergence.comm))}: first divergence at "
                    f"seq {divergence.seq} ({self.when(divergence.ts)}, {reporters}); "
                    f"expected {_text(divergence.expected_op)} at {_text(expected)}"
                ),
                title_justify="left",
            )
            for column in ("rank", "seq", "op", "call site", "tag", "state", "source", "verdict"):
                table.add_column(column, overflow="fold")
            for position in divergence.positions:
                verdict = (
                    "[bold red]MISMATCH[/]"
                    if position.rank in divergence.mismatched_ranks
                    else "as expected"
                )
                table.add_row(str(position.rank), *self.position_row(position), verdict)
            for rank in divergence.absent_ranks:
                why = (
                    "no log file" if rank in self.report.missing_ranks else "no record at this seq"
                )
                table.add_row(str(rank), *self.position_row(None), why)
            self.console.print(table)

    def render_hangs(self) -> None:
        from rich.table import Table

        for hang in self.report.hangs:
            title = (
                f"Hang on {_text(repr(hang.comm))} at seq {hang.seq}: {_text(hang.op)} at "
                f"{_text(hang.tag or hang.site)}; stuck rank(s) "
                f"{', '.join(map(str, hang.stuck_ranks)) or 'none'}"
            )
            if hang.missing_ranks:
                title += f"; never arrived: {', '.join(map(str, hang.missing_ranks))}"
            title += f"; everyone at {self.when(hang.at)}"
            table = Table(
                title=title, title_justify="left", caption=_text("; ".join(hang.evidence))
            )
            for column in ("rank", "seq", "op", "call site", "tag", "state", "source", "where"):
                table.add_column(column, overflow="fold")
            for where in hang.whereabouts:
                style = "bold red" if where.position is None else None
                table.add_row(
                    str(where.rank),
                    *self.position_row(where.position),
                    _text(where.note),
                    style=style,
                )
            self.console.print(table)

    def render_sessions(self) -> None:
        from rich.table import Table

        report = self.report
        for title, outcomes in (
            ("Sessions that never reached a terminal state", report.unfinished_sessions),
            ("Failed sessions", report.failed_sessions),
        ):
            if not outcomes:
                continue
            table = Table(title=title, title_justify="left")
            for column in ("rank", "request", "role", "peer", "state", "since", "reason"):
                table.add_column(column)
            for outcome in outcomes:
                table.add_row(
                    str(outcome.rank),
                    _text(outcome.request_id),
                    _text(outcome.role),
                    _text(outcome.peer),
                    outcome.state,
                    self.when(outcome.since),
                    _text(outcome.reason),
                )
            self.console.print(table)
        if report.quarantines:
            table = Table(title="Quarantines", title_justify="left")
            for column in ("rank", "request", "at", "from", "trigger", "reason"):
                table.add_column(column)
            for quarantine in report.quarantines:
                table.add_row(
                    str(quarantine.rank),
                    _text(quarantine.request_id),
                    self.when(quarantine.ts),
                    _text(quarantine.from_state),
                    _text(quarantine.trigger),
                    _text(quarantine.reason),
                )
            self.console.print(table)
        if report.cancels:
            table = Table(title="Cancels", title_justify="left")
            for column in ("rank", "request", "at", "state", "result", "safe to free"):
                table.add_column(column)
            for cancel in report.cancels:
                table.add_row(
                    str(cancel.rank),
                    _text(cancel.request_id),
                    self.when(cancel.ts),
                    _text(cancel.state),
                    _text(cancel.result),
                    _text(cancel.safe_to_free),
                )
            self.console.print(table)
        if report.pinned_blocks:
            table = Table(title="Deferred frees never released", title_justify="left")
            for column in ("rank", "owner", "since", "blocks"):
                table.add_column(column)
            for pinned in report.pinned_blocks:
                table.add_row(
                    str(pinned.rank),
                    _text(pinned.owner),
                    self.when(pinned.since),
                    _block_list(pinned.block_ids),
                )
            self.console.print(table)

    def render_timeline(self) -> None:
        from rich.table import Table

        report = self.report
        if report.request_id is None:
            return
        if not report.timeline:
            self.console.print(
                f"No line mentions request {report.request_id!r}.", highlight=False, markup=False
            )
            return
        table = Table(
            title=f"Timeline of request {_text(repr(report.request_id))}", title_justify="left"
        )
        for column in ("at", "rank", "event", "detail"):
            table.add_column(column)
        for entry in report.timeline:
            table.add_row(
                self.when(entry.ts), str(entry.rank), entry.event, _text(entry.detail)
            )
        self.console.print(table)

    def render_health(self) -> None:
        from rich.table import Table

        if not self.report.health_changes:
            return
        table = Table(title="Health changes", title_justify="left")
        columns = ("at", "rank", "healthy", "quarantined", "in flight", "since progress",
                   "reason", "restart")
        for column in columns:
            table.add_column(column)
        for change in self.report.health_changes:
            budget = (
                f"{_text(change.quarantined)}/{_text(change.quarantine_budget)}"
                if change.quarantine_budget is not None
                else _text(change.quarantined)
            )
            since = (
                f"{change.seconds_since_progress:.3f}s"
                if change.seconds_since_progress is not None
                else ""
            )
            table.add_row(
                self.when(change.ts),
                str(change.rank),
                _text(change.healthy),
                budget,
                _text(change.in_flight),
                since,
                _text(change.reason),
                _text(change.restart_requested),
                style=None if change.healthy else "red",
            )
        self.console.print(table)


    def render_engine(self) -> None:
        from rich.table import Table

        report = self.report
        if report.tp_failures:
            ranks = sorted({failure.rank for failure in report.tp_failures})
            table = Table(
                title=(
                    f"TP group broken (engine.tp_failed, logged by rank(s) "
                    f"{', '.join(map(str, ranks))}): every open transfer there failed"
                ),
                title_justify="left",
            )
            for column in ("at", "rank", "comm", "error type", "error"):
                table.add_column(column, overflow="fold")
            for failure in report.tp_failures:
                table.add_row(
                    self.when(failure.ts),
                    str(failure.rank),
                    _text(failure.comm),
                    _text(failure.error_type),
                    _text(failure.error),
                    style="red",
                )
            self.console.print(table)
        if report.engine_warnings:
            table = Table(title="Engine warnings (first lines of each)", title_justify="left")
            for column in ("event", "lines", "ranks", "at", "rank", "detail"):
                table.add_column(column, overflow="fold")
            for tally in report.engine_warnings:
                writers = ", ".join(map(str, tally.ranks))
                for index, example in enumerate(tally.examples):
                    head = (tally.event, str(tally.count), writers) if index == 0 else ("", "", "")
                    table.add_row(
                        *head, self.when(example.ts), str(example.rank), _text(example.detail)
                    )
            self.console.print(table)


def _text(value: object) -> str:
    """A value as table text, with rich markup characters escaped (call sites and summaries
    may hold brackets)."""
    from rich.markup import escape

    return "" if value is None else escape(str(value))


def _block_list(block_ids: tuple[int, ...], limit: int = 16) -> str:
    shown = ", ".join(map(str, block_ids[:limit]))
    return shown + (f", ... ({len(block_ids)} in all)" if len(block_ids) > limit else "")
