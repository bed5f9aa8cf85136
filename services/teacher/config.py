"""Settings of the teacher service (environment variables STILLHOUSE_TEACHER_*)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from stillhouse.common.config import GrpcServiceSettings
from stillhouse.common.paths import stillhouse_home
from stillhouse.storage.config import ObjectStoreSettings
from stillhouse.teacher.egress import parse_allow_entry


class TeacherSettings(GrpcServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="STILLHOUSE_TEACHER_", extra="forbid", env_nested_delimiter="__"
    )

    port: int = 50052
    object_store: ObjectStoreSettings = Field(default_factory=ObjectStoreSettings)
    cache_url: str = Field(
        default_factory=lambda: f"sqlite:///{stillhouse_home() / 'teacher-cache.db'}",
        description="Database of the answer cache: sqlite:///PATH or postgresql://USER@HOST/DB.",
    )
    limiter_storage_uri: str = Field(
        default="memory://",
        description="Where the rate-limit buckets live; a shared Redis (redis://HOST:6379) makes the "
        "limits hold across replicas.",
    )
    price_table: Path | None = Field(default=None, description="YAML price table; the shipped one if unset.")
    api_key_dir: Path | None = Field(
        default=None,
        description="Folder of teacher API keys (mounted Secrets): the key named `apiKeySecret` is the file "
        "of that name. Without it (or without that file) the key comes from the environment variable "
        "STILLHOUSE_TEACHER_KEY_<NAME>; never from any other variable or path.",
    )
    egress_allow: list[str] = Field(
        default_factory=list,
        description="Where teachers may be reached besides public addresses: networks in CIDR notation "
        "(10.8.0.0/16, fd00::/8) and exact host names (vllm.models.svc.cluster.local), as a JSON list in "
        "the environment. Empty: public addresses only (no loopback, private, link-local or metadata).",
    )
    # Batches of 32 generate about twice the tokens/s of batches of 8 on a 2-core CPU.
    local_max_batch_size: int = Field(default=32, ge=1, le=512)
    local_device: str = Field(default="auto", description="`auto`, `cpu` or `cuda[:N]` for local teachers.")

    @field_validator("egress_allow")
    @classmethod
    def _valid_egress_entries(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            parse_allow_entry(entry)
        return entries
