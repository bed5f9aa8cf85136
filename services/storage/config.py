"""Settings of the storage service (environment variables STILLHOUSE_STORAGE_*)."""

from __future__ import annotations

from pydantic import Field

from stillhouse.common.config import GrpcServiceSettings, settings_config


class StorageSettings(GrpcServiceSettings):
    model_config = settings_config("STILLHOUSE_STORAGE_")

    port: int = 50053
    presign_max_seconds: int = Field(
        default=3600,
        ge=1,
        le=7 * 24 * 3600,
        description="Longest validity of a presigned download URL (the S3 API allows at most 7 days).",
    )
