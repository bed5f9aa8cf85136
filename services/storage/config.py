"""Settings of the storage service (environment variables STILLHOUSE_STORAGE_*)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from stillhouse.common.config import GrpcServiceSettings
from stillhouse.common.objectstore.settings import ObjectStoreSettings


class StorageSettings(GrpcServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="STILLHOUSE_STORAGE_", extra="forbid", env_nested_delimiter="__"
    )

    port: int = 50053
    object_store: ObjectStoreSettings = Field(default_factory=ObjectStoreSettings)
    presign_max_seconds: int = Field(
        default=3600,
        ge=1,
        le=7 * 24 * 3600,
        description="Longest validity of a presigned download URL (the S3 API allows at most 7 days).",
    )
