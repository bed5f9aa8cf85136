"""Typed configuration, read once at start-up: defaults < YAML file < environment < command-line flags."""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import Field, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from stillhouse.common.objectstore.settings import ObjectStoreSettings

# A duration setting that must be more than zero (a timeout, an interval).
PositiveSeconds = Annotated[float, Field(gt=0)]

# The settings class being loaded and its file's values; nested settings objects must not see them.
_file_values: contextvars.ContextVar[tuple[type, dict[str, Any]]] = contextvars.ContextVar("_file_values")


class ConfigFileError(ValueError):
    pass


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigFileError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigFileError(f"config file {path} must hold a mapping of setting names to values")
    return values


def settings_config(env_prefix: str) -> SettingsConfigDict:
    """The configuration of a process's settings: environment variables named `env_prefix` + the field
    (nested fields joined by `__`), and no field the settings do not declare."""
    return SettingsConfigDict(env_prefix=env_prefix, extra="forbid", env_nested_delimiter="__")


class Settings(BaseSettings):
    """Base of every process's settings. Subclasses set `env_prefix`, e.g. STILLHOUSE_TEACHER_."""

    model_config = SettingsConfigDict(extra="forbid", env_nested_delimiter="__")

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"

    @classmethod
    def load(cls, config_file: Path | None = None, **flags: Any) -> Self:
        """Read the settings once. `flags` are command-line values; None means 'not given'."""
        token = _file_values.set((cls, read_config_file(config_file) if config_file else {}))
        try:
            return cls(**{name: value for name, value in flags.items() if value is not None})
        finally:
            _file_values.reset(token)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        loading, values = _file_values.get((None, {}))
        file_values = values if settings_cls is loading else {}
        file_settings = InitSettingsSource(settings_cls, init_kwargs=file_values)
        return (init_settings, env_settings, file_settings)


class ServiceCallSettings(Settings):
    """How a process proves itself to the stage services it calls; a stage service checks its callers
    with the same settings."""

    service_token_file: Path | None = Field(
        default=None,
        description="File holding the shared service token (a mounted Secret; `stillhouse up` generates "
        "one): its first line is sent as `authorization: Bearer <token>` on every call, and a service "
        "accepts any of its lines, so a new token can be rolled out beside the old one.",
    )
    tls_cert_file: Path | None = Field(
        default=None,
        description="PEM certificate this process presents: a service's server certificate, a caller's "
        "client certificate. Set with tls_key_file.",
    )
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file.")
    tls_ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle that the other side's certificate must chain to. A service with it "
        "(and with its own certificate, which it then needs) requires a client certificate (mutual TLS); a "
        "caller with it (or with its own certificate) calls over TLS, and the service's certificate must "
        "name the host it calls.",
    )

    @model_validator(mode="after")
    def _certificate_with_its_key(self) -> Self:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set tls_cert_file and tls_key_file together, or neither")
        return self


class ServerSettings(ServiceCallSettings):
    """Where a process that takes calls listens, and where it serves its metrics."""

    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port of a listener that serves only the Prometheus /metrics, without a token, for the "
        "scraper (0: a free port); none serves no such port.",
    )


class GrpcServiceSettings(ServerSettings):
    """What every gRPC service process needs to serve."""

    # Seconds in-flight RPCs get to finish after SIGTERM.
    shutdown_grace_seconds: float = 5.0
    # Largest request accepted (larger ones get RESOURCE_EXHAUSTED): bulk bytes go to object storage.
    max_request_bytes: int = 4 * 1024 * 1024
    reflection: bool = Field(
        default=False,
        description="Serve gRPC reflection (for grpcurl and the like); `stillhouse up` turns it on.",
    )
    object_store: ObjectStoreSettings = Field(default_factory=ObjectStoreSettings)
    allow_unauthenticated_calls: bool = Field(
        default=False,
        description="Serve without a service token, taking calls from anyone who can reach the port. Without "
        "it, a service with no service_token_file refuses to start.",
    )

    @model_validator(mode="after")
    def _tls_with_a_certificate(self) -> Self:
        if self.tls_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                "a service with tls_ca_file needs its own certificate, tls_cert_file and tls_key_file: "
                "without one its port would take plaintext calls"
            )
        return self
