"""Settings of the teacher service (environment variables STILLHOUSE_TEACHER_*)."""

from pydantic_settings import SettingsConfigDict

from stillhouse.common.config import GrpcServiceSettings


class TeacherSettings(GrpcServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="STILLHOUSE_TEACHER_", extra="forbid", env_nested_delimiter="__"
    )

    port: int = 50052
