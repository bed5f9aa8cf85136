"""How the CLI shows jobs, their steps and their live events (rich renderables, nothing else)."""

from __future__ import annotations

from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from stillhouse.client.events import JobEvent, PhaseEvent, ProgressEvent
from stillhouse.common.headline import gap_closed_sentence, lead_sentence

PHASE_STYLES = {
    "Pending": "dim",
    "Prompts": "cyan",
    "Teacher": "cyan",
    "Training": "cyan",
    "Evaluating": "cyan",
    "Succeeded": "bold green",
    "Failed": "bold red",
    "Cancelled": "yellow",
}
STATE_STYLES = {"running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "yellow"}


def phase_text(phase: str) -> Text:
    return Text(phase, style=PHASE_STYLES.get(phase, ""))


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def format_time(value: str | None) -> str:
    moment = parse_time(value)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "-"


def format_duration(seconds: float) -> str:
    """Coarse and short, like kubectl's AGE column: 42s, 5m, 3h, 2d."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def format_age(created_at: str | None, now: datetime | None = None) -> str:
    created = parse_time(created_at)
    if created is None:
        return "-"
    return format_duration(((now or datetime.now(UTC)) - created).total_seconds())


def jobs_table(jobs: list[dict[str, Any]], width: int, now: datetime | None = None) -> Table:
    rows = [
        [
            job["id"],
            job.get("name") or "",
            phase_text(job["phase"]),
            format_age(job.get("createdAt"), now),
            job.get("message") or "",
        ]
        for job in jobs
    ]
    return one_line_table(["ID", "NAME", "PHASE", "AGE", "MESSAGE"], rows, width)


def one_line_table(
    headers: list[str], rows: list[list[str | Text]], width: int, title: str | None = None
) -> Table:
    """A kubectl-like table, one line per row: the last (free text) column gets what width is left and
    is cut with an ellipsis; the full text is in `status ID` and `--output json`."""
    widths = [max([len(header)] + [len(row[i]) for row in rows]) for i, header in enumerate(headers[:-1])]
    left = max(10, width - sum(widths) - 2 * len(widths))
    table = Table(title=title, title_justify="left", box=None, pad_edge=False, header_style="bold")
    for header in headers[:-1]:
        table.add_column(header, no_wrap=True)
    table.add_column(headers[-1], no_wrap=True, overflow="ellipsis", max_width=left)
    for row in rows:
        table.add_row(*row)
    return table


def job_details(job: dict[str, Any], width: int, now: datetime | None = None) -> RenderableType:
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("ID", job["id"])
    summary.add_row("Name", job.get("name") or "")
    phase = phase_text(job["phase"])
    if job.get("cancelRequested") and job["phase"] not in ("Cancelled", "Failed", "Succeeded"):
        phase.append(" (cancel requested)", style="yellow")
    summary.add_row("Phase", phase)
    if job.get("message"):
        summary.add_row("Message", job["message"])
    summary.add_row(
        "Created", f"{format_time(job.get('createdAt'))} ({format_age(job.get('createdAt'), now)} ago)"
    )
    summary.add_row("Updated", format_time(job.get("updatedAt")))
    if job.get("labels"):
        summary.add_row("Labels", ", ".join(f"{key}={value}" for key, value in sorted(job["labels"].items())))
    steps = job.get("steps") or []
    if not steps:
        return Group(summary, Text("\nNo steps yet.", style="dim"))
    outcome = job_outcome(job)
    tail = [Text(""), outcome] if outcome is not None else []
    return Group(summary, Text(""), steps_table(steps, width, now), *tail)


def steps_table(steps: list[dict[str, Any]], width: int, now: datetime | None = None) -> Table:
    rows = [
        [
            step.get("stage", ""),
            Text(step.get("state", ""), style=STATE_STYLES.get(step.get("state", ""), "")),
            str(step.get("attempt", "")),
            _step_duration(step, now),
            step.get("operationId", ""),
            step.get("error") or _result_summary(step.get("result")),
        ]
        for step in steps
    ]
    headers = ["STAGE", "STATE", "ATTEMPT", "DURATION", "OPERATION", "DETAIL"]
    return one_line_table(headers, rows, width, title="Steps")


def _step_duration(step: dict[str, Any], now: datetime | None) -> str:
    started = parse_time(step.get("startedAt"))
    if started is None:
        return "-"
    finished = parse_time(step.get("finishedAt")) or now or datetime.now(UTC)
    return format_duration((finished - started).total_seconds())


def _result_summary(result: dict[str, Any] | None) -> str:
    if not result:
        return ""
    return ", ".join(f"{key}={value}" for key, value in result.items() if not isinstance(value, dict | list))


def endpoint_panel(api_url: str, token_file: str, logs: str) -> Panel:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("API", api_url)
    grid.add_row("Docs", f"{api_url}/docs")
    grid.add_row("Token file", token_file)
    grid.add_row("Logs", logs)
    return Panel(
        Group(grid, Text(""), Text("Ctrl-C to stop", style="dim")),
        title="Stillhouse is up",
        title_align="left",
        border_style="green",
        expand=False,
    )


class EventsView:
    """Shows a job's event stream: phase changes and errors as lines, progress as one bar per stage.

    On a terminal the bars are a live display with an ETA; elsewhere (a pipe, a log) each progress
    event becomes a plain line, so the output stays readable when it is not a screen.
    """

    def __init__(self, console: Console, job_id: str) -> None:
        self.console = console
        self.job_id = job_id
        self.phase: str | None = None
        self._interactive = console.is_terminal
        self._progress = Progress(
            TextColumn("{task.description:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[message]}"),
            console=console,
        )
        self._tasks: dict[str, TaskID] = {}
        self._live = Live(self._render(), console=console, auto_refresh=True, refresh_per_second=4)

    def __enter__(self) -> EventsView:
        if self._interactive:
            self._live.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._interactive:
            self._live.update(self._render(), refresh=True)
            self._live.stop()

    def on_event(self, event: JobEvent) -> None:
        if isinstance(event, PhaseEvent):
            self.on_phase(event.phase, event.message)
        elif isinstance(event, ProgressEvent):
            self.on_progress(event)
        else:
            self.on_error(event.message)

    def on_phase(self, phase: str, message: str | None) -> None:
        self.phase = phase
        line = Text.assemble(f"job {self.job_id}: ", phase_text(phase))
        if message:
            line.append(f" - {message}")
        self.console.print(line, soft_wrap=True)
        self._refresh()

    def on_progress(self, event: ProgressEvent) -> None:
        stage, unit, done, total = event.stage or "?", event.unit, event.done, event.total or None
        fields = {"unit": unit, "message": escape(event.message)}
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=total, completed=done, **fields)
        else:
            self._progress.update(self._tasks[stage], total=total, completed=done, **fields)
        if not self._interactive:
            of_total = f"/{total}" if total else ""
            message = f"  {event.message}" if event.message else ""
            line = f"  {stage} {done}{of_total} {unit}{message}"
            self.console.print(line, markup=False, soft_wrap=True)
        self._refresh()

    def on_error(self, message: str) -> None:
        self.console.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)

    def _refresh(self) -> None:
        if self._interactive:
            self._live.update(self._render(), refresh=True)

    def _render(self) -> RenderableType:
        header = Text.assemble(f"job {self.job_id}  phase ", phase_text(self.phase or "..."))
        return Group(header, self._progress) if self._tasks else header


def estimate_table(estimate: dict[str, Any]) -> Table:
    """An estimate from `POST /v1/jobs:estimate`: prompts, then what the teacher would be paid."""
    prompts, teacher, generation = estimate["prompts"], estimate["teacher"], estimate["generation"]
    table = Table(title="Estimate", title_justify="left", show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("Training prompts", f"{prompts['train']:,}")
    table.add_row("Held-out prompts", f"{prompts['holdout']:,}")
    removed = ", ".join(f"{rule} {count:,}" for rule, count in sorted(prompts["removedByRule"].items()))
    table.add_row("Collected", f"{prompts['collected']:,}" + (f" (removed: {removed})" if removed else ""))
    if prompts["shortfall"]:
        table.add_row("Short of the count", f"{prompts['shortfall']:,}")
    table.add_row("Teacher requests", f"{teacher['requests']:,}")
    table.add_row("Prompt tokens", f"{teacher['promptTokens']:,}")
    table.add_row("Completion tokens (at most)", f"{teacher['completionTokens']:,}")
    table.add_row("Teacher cost (at most)", f"${teacher['costUsd']:,.2f}")
    if generation["requests"]:
        table.add_row(
            "Spent generating prompts",
            f"${generation['costUsd']:,.2f} ({generation['requests']:,} calls, "
            f"{generation['cachedRequests']:,} from the cache)",
        )
    table.add_row("Total (at most)", f"${estimate['totalUsd']:,.2f}")
    return table


def _figure(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"


# The evaluation's rows as the summary names them (camelCase), with their column headers, in order.
EVALUATION_ROWS = (
    ("uniform", "uniform"),
    ("unigram", "unigram"),
    ("baseline", "untrained"),
    ("controlSft", "SFT control"),
    ("student", "student"),
    ("teacher", "teacher"),
)


def evaluation_table(evaluation: dict[str, Any]) -> Table:
    """Every evaluated row's figures on the held-out prompts, one column per row ("-" where undefined)."""
    rows = [(key, header) for key, header in EVALUATION_ROWS if evaluation.get(key) is not None]
    metrics = sorted(set().union(*(evaluation[key] for key, _ in rows)))
    table = Table(title="Evaluation on the held-out prompts", title_justify="left")
    table.add_column("metric", justify="left")
    for _, header in rows:
        table.add_column(header, justify="right")
    for metric in metrics:
        table.add_row(metric, *(_figure(evaluation[key].get(metric)) for key, _ in rows))
    return table


def job_outcome(job: dict[str, Any]) -> RenderableType | None:
    """What a job produced: the evaluation against the teacher, its cost, and where its artifacts are."""
    summary = job.get("summary")
    if not summary:
        return None
    parts: list[RenderableType] = []
    evaluation = summary.get("evaluation")
    if evaluation:
        headline = gap_closed_sentence(evaluation.get("gapClosed") or {})
        parts += [evaluation_table(evaluation), Text(headline, style="bold")]
        if lead := lead_sentence(evaluation.get("controlSftLead") or {}, "the SFT control"):
            parts.append(Text(lead))
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    if prompts := summary.get("prompts"):
        facts.add_row(
            "Prompts",
            f"{prompts['train']:,} training, {prompts['holdout']:,} held out "
            f"({prompts['collected']:,} collected)",
        )
    if teacher := summary.get("teacher"):
        facts.add_row(
            "Teacher",
            f"{teacher['requests']:,} calls ({teacher['cachedRequests']:,} from the cache), "
            f"{teacher['promptTokens']:,} prompt + {teacher['completionTokens']:,} completion tokens",
        )
    if training := summary.get("training"):
        facts.add_row("Training", f"{training['steps']:,} steps, {training['tokens']:,} tokens")
    cost = summary["cost"]
    facts.add_row("Cost", f"${cost['totalUsd']:,.2f} teacher, {cost['gpuHours']:,.2f} GPU hours")
    for name, artifact_id in sorted(summary.get("artifacts", {}).items()):
        facts.add_row(
            name.capitalize(), f"{artifact_id}  (stillhouse pull {job['id']} DIR --artifact {name})"
        )
    parts.append(facts)
    return Group(*parts)
