"""Settings of the trainer service (environment variables STILLHOUSE_TRAINER_*)."""

from pydantic_settings import SettingsConfigDict

from stillhouse.common.config import GrpcServiceSettings


class TrainerSettings(GrpcServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="STILLHOUSE_TRAINER_", extra="forbid", env_nested_delimiter="__"
    )

    port: int = 50054
