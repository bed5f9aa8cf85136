"""Settings of a Ray head that a service starts on its own machine (embedded mode)."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stillhouse.common.config import PositiveSeconds
from stillhouse.common.paths import stillhouse_home

# A Unix socket's path may not exceed 107 bytes, and Ray puts sockets at
# `<temp dir>/r/session_<date>_<time>_<microseconds>_<pid>/sockets/dash_<dashboard module>`: 73 bytes
# more with a 7-digit pid and the longest module name (TaskEventsHead).
MAX_RAY_TEMP_DIR_CHARS = 34


def default_ray_temp_dir(home: Path) -> Path:
    """`<home>/ray` where Ray's socket paths fit under it, else a short folder named after `home` in the
    system's temp dir, or in /tmp where the temp dir's own path is too long for that (TMPDIR=/var/tmp)."""
    preferred = home.absolute() / "ray"
    if _path_bytes(preferred) <= MAX_RAY_TEMP_DIR_CHARS:
        return preferred
    name = f"stillhouse-ray-{hashlib.sha256(str(home.absolute()).encode()).hexdigest()[:12]}"
    in_temp_dir = Path(tempfile.gettempdir()) / name
    return in_temp_dir if _path_bytes(in_temp_dir) <= MAX_RAY_TEMP_DIR_CHARS else Path("/tmp") / name


def _path_bytes(folder: Path) -> int:
    return len(str(folder.absolute()).encode())


class LocalRaySettings(BaseModel):
    """The Ray head the service starts on its own machine when no `ray_address` is given (embedded mode)."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: int | None = Field(default=None, gt=0, description="CPUs Ray may use; all of them if unset.")
    num_gpus: int | None = Field(default=None, ge=0, description="GPUs Ray may use; all visible if unset.")
    dashboard_port: int = Field(
        default=0, ge=0, le=65535, description="Port of the dashboard and job API; 0 picks a free one."
    )
    temp_dir: Path = Field(
        default_factory=lambda: default_ray_temp_dir(stillhouse_home()),
        description="Ray's session files, logs and the Ray Train storage of local runs; default: "
        "`<STILLHOUSE_HOME>/ray`, or a short folder in the system's temp dir (or /tmp) when that path is too "
        "long.",
    )
    # Loopback is shared by every local user and process, so the head wants its token as a cluster does.
    auth_mode: Literal["disabled", "token"] = Field(
        default="token",
        description="`token`: every call to the head (job API, dashboard, GCS, Ray client) must carry the "
        "token in auth_token_file; `disabled` takes calls from any local process.",
    )
    auth_token_file: Path = Field(
        default_factory=lambda: stillhouse_home() / "ray-auth-token",
        description="The local head's token, generated (mode 0600) on first start and kept.",
    )
    startup_timeout_seconds: PositiveSeconds = 90.0

    @field_validator("temp_dir")
    @classmethod
    def _fits_ray_socket_paths(cls, temp_dir: Path) -> Path:
        length = _path_bytes(temp_dir)
        if length > MAX_RAY_TEMP_DIR_CHARS:
            raise ValueError(
                f"{temp_dir.absolute()} is {length} bytes long; at most {MAX_RAY_TEMP_DIR_CHARS} are "
                "allowed, because Ray's socket paths under it may not exceed 107 bytes: choose a shorter one"
            )
        return temp_dir


class RayClusterAccess(BaseModel):
    """How a service calls a Ray cluster's job API. The cluster's `ray_address` is the service's own
    setting: what it does without one differs."""

    ray_auth_token_file: Path | None = Field(
        default=None, description="File holding the cluster's Ray auth token, for clusters with token auth."
    )
    ray_connect_timeout_seconds: PositiveSeconds = 10.0
    ray_poll_seconds: PositiveSeconds = Field(
        default=1.0, description="How often a Ray job's status is polled."
    )

    def ray_auth_token(self) -> str | None:
        """The token in `ray_auth_token_file`; None without that file."""
        if self.ray_auth_token_file is None:
            return None
        return self.ray_auth_token_file.read_text().strip()
