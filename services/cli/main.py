"""The `stillhouse` command: run a service (`serve`), run them all on this machine (`up`), and drive jobs.

Heavy modules (services, httpx, grpc) are imported inside the commands that need them, so that
`stillhouse --help` and the service processes start fast.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from stillhouse.common.job_phases import Phase
from stillhouse.common.paths import stillhouse_home

if TYPE_CHECKING:
    from stillhouse.client import Client, StillhouseError

app = typer.Typer(
    name="stillhouse",
    help="Distil big teacher LLMs into small student models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console(highlight=False)
# Messages are never wrapped at the terminal width, so they can be copied and grepped whole.
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class ServiceName(StrEnum):
    CONTROL_PLANE = "control-plane"
    PROMPTS = "prompts"
    TEACHER = "teacher"
    STORAGE = "storage"
    TRAINER = "trainer"


# service -> (settings module, settings class, module with the blocking `run(settings)`)
_SERVICES = {
    ServiceName.CONTROL_PLANE: (
        "stillhouse.control_plane.config",
        "ControlPlaneSettings",
        "stillhouse.control_plane.app",
    ),
    ServiceName.PROMPTS: ("stillhouse.prompts.config", "PromptsSettings", "stillhouse.prompts.server"),
    ServiceName.TEACHER: ("stillhouse.teacher.config", "TeacherSettings", "stillhouse.teacher.server"),
    ServiceName.STORAGE: ("stillhouse.storage.config", "StorageSettings", "stillhouse.storage.server"),
    ServiceName.TRAINER: ("stillhouse.trainer.config", "TrainerSettings", "stillhouse.trainer.server"),
}

# Exit codes of `stillhouse events` by the job's final phase.
_PHASE_EXIT_CODES = {Phase.SUCCEEDED: 0, Phase.FAILED: 1, Phase.CANCELLED: 3}


class OutputFormat(StrEnum):
    TABLE = "table"
    JSON = "json"


ApiUrlOption = Annotated[
    str | None,
    typer.Option(
        "--api-url",
        envvar="STILLHOUSE_API_URL",
        help="Base URL of the Stillhouse API (default: the one `stillhouse up` started).",
        show_default=False,
    ),
]


HomeOption = Annotated[
    Path | None,
    typer.Option(
        help="Folder for the database, logs and token (default: $STILLHOUSE_HOME or ~/.stillhouse).",
        show_default=False,
    ),
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(message, markup=False)
    return typer.Exit(code)


# --- running services ---------------------------------------------------------------------------


@app.command()
def serve(
    service: Annotated[ServiceName, typer.Argument(help="Which service this process runs.")],
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML settings file (environment and flags override it).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.", show_default=False)] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.", show_default=False)] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Port of the Prometheus /metrics endpoint, open without a token.", show_default=False
        ),
    ] = None,
) -> None:
    """Run one Stillhouse service in the foreground until SIGTERM or Ctrl-C."""
    from pydantic import ValidationError

    from stillhouse.common.config import ConfigFileError
    from stillhouse.common.service_credentials import ServiceCredentialsError

    settings_module, settings_class, server_module = _SERVICES[service]
    flags: dict[str, Any] = {"host": host, "port": port, "metrics_port": metrics_port}
    settings_type = getattr(importlib.import_module(settings_module), settings_class)
    try:
        settings = settings_type.load(config, **flags)
    except ConfigFileError as exc:
        raise _fail(str(exc), 2) from None
    except ValidationError as exc:
        prefix = settings_type.model_config.get("env_prefix", "")
        sources = f"config file, {prefix}* environment, flags"
        err_console.print(f"invalid {service} settings ({sources}):", markup=False)
        for line in settings_error_lines(exc):
            err_console.print(f"  {line}", markup=False)
        raise typer.Exit(2) from None
    try:
        importlib.import_module(server_module).run(settings)
    except ServiceCredentialsError as exc:
        raise _fail(f"cannot start the {service} service: {exc}", 2) from None


def settings_error_lines(exc: Any) -> list[str]:
    """One `field: problem` line per error of a pydantic ValidationError."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return lines


@app.command()
def up(
    home: HomeOption = None,
    api_port: Annotated[int, typer.Option(help="Port of the REST API.")] = 8080,
    host: Annotated[
        str, typer.Option(help="Loopback address the REST API listens on (127.0.0.1, ::1 or localhost).")
    ] = "127.0.0.1",
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for every service to become healthy.")
    ] = 60.0,
    input_root: Annotated[
        list[Path] | None,
        typer.Option(
            help="A folder jobs may read local prompt sources and slot files from (repeat for more); "
            "$STILLHOUSE_HOME/inputs always is one.",
            exists=True,
            file_okay=False,
        ),
    ] = None,
) -> None:
    """Run every Stillhouse service on this machine until Ctrl-C."""
    from stillhouse.cli.embedded import EmbeddedError, Supervisor

    try:
        supervisor = Supervisor(
            home=(home or stillhouse_home()).expanduser().absolute(),
            api_port=api_port,
            host=host,
            startup_timeout=timeout,
            input_roots=tuple(folder.absolute() for folder in input_root or ()),
            console=console,
            err_console=err_console,
        )
        code = supervisor.run()
    except EmbeddedError as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


@app.command()
def migrate(
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            envvar="STILLHOUSE_CONTROL_PLANE_DATABASE_URL",
            help="The job store: sqlite:///PATH or postgresql://USER@HOST/DB (default: the database of "
            "`stillhouse up` in $STILLHOUSE_HOME).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Bring the job store's database to this release's schema (idempotent). The Helm chart runs it
    before every install and upgrade; embedded mode migrates at start-up by itself."""
    from sqlalchemy.exc import SQLAlchemyError

    from stillhouse.control_plane.store import migrate as migrate_job_store

    url = database_url or f"sqlite:///{stillhouse_home() / 'stillhouse.db'}"
    try:
        migrate_job_store(url)
    except ValueError as exc:
        raise _fail(f"--database-url: {exc}", 2) from None
    except SQLAlchemyError as exc:
        raise _fail(f"cannot migrate the job store: {type(exc).__name__}: {exc.orig or exc}") from None
    console.print("the job store's schema is up to date")


# --- driving jobs -------------------------------------------------------------------------------


def _report_error(exc: StillhouseError) -> int:
    """Print what went wrong in the user's terms; the exit code: 2 for an invalid spec, else 1."""
    from stillhouse.client import InvalidRequest, NotFound, Unauthorized

    if isinstance(exc, InvalidRequest):
        for line in exc.lines():
            err_console.print(line, markup=False)
        return 2
    if isinstance(exc, Unauthorized):
        message = "the API refused the token (401): check STILLHOUSE_API_TOKEN or the token file"
    elif isinstance(exc, NotFound) and exc.job_id is not None:
        message = f"no job {exc.job_id}"
    else:
        message = str(exc)
    err_console.print(message, markup=False)
    return 1


@contextmanager
def _api_client(api_url: str | None) -> Iterator[Client]:
    """A client of the API found from the flag/environment or `stillhouse up`; API errors become
    one printed message and an exit code."""
    from stillhouse.client import Client, StillhouseError

    try:
        with Client(url=api_url) as client:
            yield client
    except StillhouseError as exc:
        raise typer.Exit(_report_error(exc)) from None


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def _as_json(model: Any) -> Any:
    """A wire model as the API sent it (camelCase JSON data)."""
    return model.model_dump(mode="json", by_alias=True)


@app.command()
def submit(
    file: Annotated[
        Path,
        typer.Argument(
            help="DistillationJob spec, YAML or JSON.", exists=True, dir_okay=False, readable=True
        ),
    ],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the job id.")] = False,
    api_url: ApiUrlOption = None,
) -> None:
    """Submit a distillation job."""
    with _api_client(api_url) as client:
        job = client.submit(file)
    if quiet:
        sys.stdout.write(job.id + "\n")
    else:
        console.print(f"job {job.id} submitted (phase {job.phase})", markup=False, soft_wrap=True)


@app.command()
def estimate(
    file: Annotated[
        Path,
        typer.Argument(
            help="DistillationJob spec, YAML or JSON.", exists=True, dir_okay=False, readable=True
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the estimate as JSON.")] = False,
    api_url: ApiUrlOption = None,
) -> None:
    """What a job would cost, without running it: builds its prompts and prices the teacher's answers.

    Prompt generation through the teacher (self_instruct, evol_instruct) is real and cached: the job
    does not pay for it twice."""
    from stillhouse.cli.display import estimate_table

    with _api_client(api_url) as client:
        result = _as_json(client.estimate(file, timeout=None))
    if as_json:
        _print_json(result)
    else:
        console.print(estimate_table(result))


@app.command()
def status(
    job_id: Annotated[str | None, typer.Argument(metavar="ID", help="Show this job in detail.")] = None,
    phase: Annotated[
        Phase | None, typer.Option(case_sensitive=False, help="List only jobs in this phase.")
    ] = None,
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", help="Output format.")
    ] = OutputFormat.TABLE,
    api_url: ApiUrlOption = None,
) -> None:
    """List jobs, or show one job and its steps."""
    from stillhouse.cli.display import job_details, jobs_table

    with _api_client(api_url) as client:
        if job_id is not None:
            job = _as_json(client.get(job_id))
            if output is OutputFormat.JSON:
                _print_json(job)
            else:
                console.print(job_details(job, console.width))
            return
        jobs = [_as_json(job) for job in client.iter_jobs(phase=phase.value if phase else None)]
    if output is OutputFormat.JSON:
        _print_json(jobs)
    elif not jobs:
        err_console.print(f"no jobs in phase {phase.value}" if phase else "no jobs")
    else:
        console.print(jobs_table(jobs, console.width))


def _follow(client: Client, job_id: str, *, follow: bool = True) -> int:
    """Show a job's events as they come; the exit code for its final phase."""
    from stillhouse.cli.display import EventsView

    with EventsView(console, job_id) as view:
        for event in client.events(job_id, follow=follow):
            view.on_event(event)
    return _PHASE_EXIT_CODES.get(view.phase, 0)


@app.command()
def events(
    job_id: Annotated[str, typer.Argument(metavar="ID", help="The job to watch.")],
    follow: Annotated[
        bool, typer.Option("--follow/--no-follow", help="Wait for new events until the job finishes.")
    ] = True,
    api_url: ApiUrlOption = None,
) -> None:
    """Watch a job's phases and progress. Exit code: 0 Succeeded, 1 Failed, 3 Cancelled."""
    try:
        with _api_client(api_url) as client:
            code = _follow(client, job_id, follow=follow)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise typer.Exit(code)


@app.command()
def run(
    file: Annotated[
        Path,
        typer.Argument(
            help="DistillationJob spec, YAML or JSON.", exists=True, dir_okay=False, readable=True
        ),
    ],
    home: HomeOption = None,
    api_port: Annotated[int, typer.Option(help="Port of the REST API.")] = 8080,
) -> None:
    """Run one job on this machine: start every service, submit FILE, follow it to the end, stop.

    The job may read local files from FILE's folder (and below it) and from $STILLHOUSE_HOME/inputs.

    Exit code: 0 Succeeded, 1 Failed, 3 Cancelled, 130 interrupted."""
    from stillhouse.cli.display import job_outcome
    from stillhouse.cli.embedded import EmbeddedError, Supervisor
    from stillhouse.client import ApiEndpoint, Client, StillhouseError
    from stillhouse.client.specs import spec_file_body

    # Read now, with its local paths made absolute: the job reads them from FILE's folder.
    body, _ = spec_file_body(file)

    def session(endpoint: ApiEndpoint) -> int:
        try:
            with Client(url=endpoint.url, token=endpoint.token) as client:
                job = client.submit(body)
                console.print(f"job {job.id} submitted from {file}", markup=False, soft_wrap=True)
                code = _follow(client, job.id)
                outcome = job_outcome(_as_json(client.get(job.id)))
                if outcome is not None:
                    console.print(outcome)
                return code
        except StillhouseError as exc:
            return _report_error(exc)

    try:
        supervisor = Supervisor(
            home=(home or stillhouse_home()).expanduser().absolute(),
            api_port=api_port,
            input_roots=(file.parent.absolute(),),
            console=console,
            err_console=err_console,
        )
        code = supervisor.run(session)
    except EmbeddedError as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


class ArtifactChoice(StrEnum):
    STUDENT = "student"
    BASELINE = "baseline"
    REPORT = "report"


@app.command()
def pull(
    job_id: Annotated[str, typer.Argument(metavar="ID", help="The job whose artifact to download.")],
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="New or empty folder to download into.")],
    artifact: Annotated[
        ArtifactChoice, typer.Option(case_sensitive=False, help="Which artifact of the job.")
    ] = ArtifactChoice.STUDENT,
    api_url: ApiUrlOption = None,
) -> None:
    """Download a job's student (a Hugging Face model folder), baseline or report, verified."""
    sizes: list[int] = []

    def downloaded(path: str, size: int) -> None:
        sizes.append(size)
        err_console.print(f"  {path} ({size:,} bytes)", markup=False)

    with _api_client(api_url) as client:
        client.pull(job_id, folder, artifact.value, on_file=downloaded)
    total = sum(sizes)
    console.print(
        f"{artifact.value} of job {job_id} ({total:,} bytes) is in {folder}", markup=False, soft_wrap=True
    )
    if artifact is ArtifactChoice.STUDENT:
        console.print(
            f"load it with: AutoModelForCausalLM.from_pretrained({str(folder)!r})",
            markup=False,
            soft_wrap=True,
        )


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(metavar="ID", help="The job to cancel.")],
    api_url: ApiUrlOption = None,
) -> None:
    """Ask a job to stop; it moves to Cancelled once its current step has stopped."""
    with _api_client(api_url) as client:
        job = client.cancel(job_id)
    state = "cancel requested" if job.cancel_requested and job.phase != Phase.CANCELLED else ""
    console.print(
        f"job {job.id}: phase {job.phase}" + (f", {state}" if state else ""),
        markup=False,
        soft_wrap=True,
    )


if __name__ == "__main__":
    app()
