"""Where datasets and artifacts live: the `object_store` section that every service reading or writing
data carries."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from stillhouse.common.paths import stillhouse_home


class ObjectStoreSettings(BaseModel):
    """Where datasets and artifacts live: a local folder (embedded default) or an S3 API (MinIO, AWS...)."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["local", "s3"] = "local"
    bucket: str = Field(default="stillhouse", min_length=3, max_length=63)
    local_root: Path = Field(
        default_factory=lambda: stillhouse_home() / "objects",
        description="For `local`: the folder that holds the bucket folder.",
    )
    endpoint: str | None = Field(default=None, description="For `s3`: host:port of the S3 API.")
    secure: bool = Field(default=False, description="For `s3`: use HTTPS.")
    region: str | None = None
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None
    # Multipart uploads: size of one part and how many parts go up at once.
    part_size_mb: int = Field(default=16, ge=5, le=5120)
    parallel_uploads: int = Field(default=4, ge=1, le=64)

    @model_validator(mode="after")
    def _s3_needs_endpoint_and_keys(self) -> ObjectStoreSettings:
        if self.backend == "s3":
            missing = [
                name for name in ("endpoint", "access_key", "secret_key") if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(f"the s3 backend needs {', '.join(missing)}")
        return self
