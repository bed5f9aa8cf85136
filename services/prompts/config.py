"""Settings of the prompts service (environment variables STILLHOUSE_PROMPTS_*)."""

from pydantic_settings import SettingsConfigDict

from stillhouse.common.config import GrpcServiceSettings


class PromptsSettings(GrpcServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="STILLHOUSE_PROMPTS_", extra="forbid", env_nested_delimiter="__"
    )

    port: int = 50051
