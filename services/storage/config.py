"""Settings of the storage service (environment variables STILLHOUSE_STORAGE_*)."""

from pydantic_settings import SettingsConfigDict

from stillhouse.common.config import GrpcServiceSettings


class StorageSettings(GrpcServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="STILLHOUSE_STORAGE_", extra="forbid", env_nested_delimiter="__"
    )

    port: int = 50053
