"""Settings of the teacher service (environment variables STILLHOUSE_TEACHER_*)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from stillhouse.common.config import GrpcServiceSettings, PositiveSeconds, settings_config
from stillhouse.common.fanout.settings import FanoutSettings
from stillhouse.common.models.settings import ModelSettings
from stillhouse.common.paths import stillhouse_home
from stillhouse.teacher.egress import parse_allow_entry


class TeacherSettings(GrpcServiceSettings):
    model_config = settings_config("STILLHOUSE_TEACHER_")

    port: int = 50052
    models: ModelSettings = Field(
        default_factory=ModelSettings,
        description="Where the weights of a `local` teacher are: its models root and download cache.",
    )
    cache_url: str = Field(
        default_factory=lambda: f"sqlite:///{stillhouse_home() / 'teacher-cache.db'}",
        description="Database of the answer cache: sqlite:///PATH or postgresql://USER@HOST/DB.",
    )
    # Expiry bounds the number of answers, not their bytes: a size bound would need each answer's size
    # stored and summed, and PostgreSQL keeps a deleted row's space for reuse rather than handing it back.
    # An answer's size is close to predictable (its logprobs, at most 8 bytes per alternative per token).
    cache_max_age_days: float | None = Field(
        default=None,
        gt=0,
        description="Delete cached answers this many days after they were written; none, the default, keeps "
        "them. An expired answer a job needs is asked (and paid for) again.",
    )
    cache_max_entries: int | None = Field(
        default=None,
        gt=0,
        description="Keep at most this many cached answers, deleting the least recently written beyond it "
        "(not the least recently read: a read does not write); none, the default, sets no bound.",
    )
    cache_sweep_interval_seconds: PositiveSeconds = Field(
        default=3600.0,
        le=86_400,
        description="How often the cache is brought within `cache_max_age_days` and `cache_max_entries`, "
        "when either is set (and once at start-up).",
    )
    fanout: FanoutSettings = Field(
        default_factory=FanoutSettings,
        description="How the teacher stage fans its shards out over a Ray cluster's CPU workers "
        "(STILLHOUSE_TEACHER_FANOUT__*); unset `ray_address`: every stage runs in this process.",
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
    # On a 2-core CPU, SmolLM2 generates about twice the tokens/s in batches of 32 as in batches of 8, and
    # 1.2 times more again in batches of 64.
    local_max_batch_size: int = Field(default=64, ge=1, le=512)
    local_device: str = Field(default="auto", description="`auto`, `cpu` or `cuda[:N]` for local teachers.")

    @field_validator("egress_allow")
    @classmethod
    def _valid_egress_entries(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            parse_allow_entry(entry)
        return entries
