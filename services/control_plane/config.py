"""Settings of the control plane (environment variables STILLHOUSE_CONTROL_PLANE_*)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, model_validator

from stillhouse.common.config import PositiveSeconds, ServerSettings, settings_config
from stillhouse.common.database_retry import DEFAULT_RETRY_SECONDS
from stillhouse.common.operations import WATCH_HEARTBEAT_SECONDS
from stillhouse.common.paths import stillhouse_home
from stillhouse.control_plane.principals import AccessControl, PrincipalsFile, read_principals_file


class ServiceAddresses(BaseModel):
    """host:port of each stage service."""

    model_config = ConfigDict(extra="forbid")

    prompts: str = "127.0.0.1:50051"
    teacher: str = "127.0.0.1:50052"
    storage: str = "127.0.0.1:50053"
    trainer: str = "127.0.0.1:50054"


class ControlPlaneSettings(ServerSettings):
    """The REST API's own settings; `service_token_file` and `tls_*` are how it calls the stage services.
    Besides `metrics_port`, the API serves /metrics on its own port, to callers with a token."""

    model_config = settings_config("STILLHOUSE_CONTROL_PLANE_")

    port: int = 8080
    database_url: str = Field(
        default_factory=lambda: f"sqlite:///{stillhouse_home() / 'stillhouse.db'}",
        description="sqlite:///PATH or postgresql://USER@HOST/DB",
    )
    api_tokens: list[SecretStr] = Field(default_factory=list, description="Accepted bearer tokens.")
    api_token_file: Path | None = Field(
        default=None, description="File with one accepted token per line (a mounted Secret)."
    )
    principals_file: Path | None = Field(
        default=None,
        description="YAML file of principals (name, tenant, role, token or tokenSha256) and tenant quotas "
        "(a mounted Secret); see stillhouse.control_plane.principals. Tokens of `api_tokens` and "
        "`api_token_file` are admins of the tenant `default`.",
    )
    services: ServiceAddresses = Field(default_factory=ServiceAddresses)
    input_roots: list[Path] = Field(
        default_factory=list,
        description="Folders a spec's local prompt sources and slot files must lie in (embedded mode); "
        "none, the default, accepts s3:// inputs only. Checked at submit; the prompts service enforces it.",
    )
    database_retry_seconds: float = Field(
        default=DEFAULT_RETRY_SECONDS,
        ge=0,
        description="How long a job store call keeps trying through transient database errors (a dropped "
        "connection, a failover, a locked SQLite file) before it fails; running jobs outlast longer outages.",
    )
    service_unavailable_timeout_seconds: PositiveSeconds = Field(
        default=600.0,
        description="How long a stage's service may go without answering (down, restarting or stalled) "
        "before its job fails with a message naming it; until then the job re-attaches as it comes back.",
    )
    service_call_timeout_seconds: PositiveSeconds = Field(
        default=30.0, description="Deadline of each call that starts or re-attaches a stage."
    )
    watch_idle_timeout_seconds: float = Field(
        default=30.0,
        gt=WATCH_HEARTBEAT_SECONDS,
        description="A stage's progress stream that sends nothing, not even the heartbeat its service "
        f"sends every {WATCH_HEARTBEAT_SECONDS:g} s, for this long is given up and re-attached.",
    )
    estimate_timeout_seconds: PositiveSeconds = Field(
        default=600.0, le=3600, description="Longest an estimate may take before it is stopped (504)."
    )
    # How often progress is written to the job's events at most (progress arrives faster).
    progress_event_interval_seconds: float = 1.0
    finished_job_max_age_hours: float | None = Field(
        default=None,
        gt=0,
        description="Delete jobs (their rows and objects) this many hours after they finished; none, the "
        "default, keeps them until DELETE /v1/jobs/{id}.",
    )
    # How often the sweep looks for expired jobs, when `finished_job_max_age_hours` is set.
    expiry_sweep_interval_seconds: PositiveSeconds = 3600.0

    migrate_at_start: bool = Field(
        default=True,
        description="Bring the job store's schema to this release at start-up. The Helm chart sets it false "
        "and runs `stillhouse migrate` as a hook; the control plane then waits until the schema is there.",
    )
    leader_lease_seconds: float = Field(
        default=15.0,
        ge=1,
        le=300,
        description="Control planes sharing a PostgreSQL database elect one to drive the jobs, through a "
        "lease of this length: when the leader dies another takes over within 1.25 times it, and a leader "
        "that cannot renew stops driving after 0.8 times it. SQLite (embedded mode): the only one leads.",
    )
    job_poll_seconds: PositiveSeconds = Field(
        default=10.0,
        le=600,
        description="How often the leader looks in the store for jobs submitted or cancelled through "
        "another control plane whose notification it missed.",
    )

    # Read and checked once, at load, so that a bad file stops the process with an error naming it.
    _principals: PrincipalsFile | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _metrics_on_a_port_of_their_own(self) -> ControlPlaneSettings:
        if self.metrics_port is not None and self.metrics_port != 0 and self.metrics_port == self.port:
            raise ValueError(
                f"metrics_port must differ from port ({self.port}): the API port serves metrics only with "
                "a token"
            )
        return self

    @model_validator(mode="after")
    def _some_token(self) -> ControlPlaneSettings:
        if not self.api_tokens and self.api_token_file is None and self.principals_file is None:
            raise ValueError(
                "set `api_tokens`, `api_token_file` or `principals_file`: the API refuses to run without a "
                "token"
            )
        if self.principals_file is not None:
            self._principals = read_principals_file(self.principals_file)
        return self

    def accepted_tokens(self) -> list[str]:
        tokens = [token.get_secret_value() for token in self.api_tokens]
        if self.api_token_file is not None:
            tokens += [line.strip() for line in self.api_token_file.read_text().splitlines() if line.strip()]
        return tokens

    def access_control(self) -> AccessControl:
        """The principals of the tokens and of the principals file, and the tenants' quotas."""
        return AccessControl.of(self.accepted_tokens(), self._principals)
