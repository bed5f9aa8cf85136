"""Settings of the prompts service (environment variables STILLHOUSE_PROMPTS_*)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from stillhouse.common.config import GrpcServiceSettings, PositiveSeconds, settings_config
from stillhouse.common.fanout.settings import FanoutSettings


class PromptsSettings(GrpcServiceSettings):
    model_config = settings_config("STILLHOUSE_PROMPTS_")

    port: int = 50051
    input_roots: list[Path] = Field(
        default_factory=list,
        description="Folders local prompt sources and slot files must lie in (embedded mode); none, the "
        "default, reads s3:// inputs only.",
    )
    teacher_address: str = Field(
        default="127.0.0.1:50052",
        description="host:port of the teacher service, which self_instruct and evol_instruct call.",
    )
    generation_concurrency: int = Field(
        default=8, ge=1, le=256, description="Teacher calls in flight at once while generating prompts."
    )
    generation_patience: int = Field(
        default=16,
        ge=1,
        description="Teacher calls in a row that add no new prompt before generation stops short of "
        "`count` (the shortfall is reported).",
    )
    teacher_timeout_seconds: PositiveSeconds = Field(
        default=600.0, description="Longest wait for one teacher call (a local teacher may queue it)."
    )
    fanout: FanoutSettings = Field(
        default_factory=FanoutSettings,
        description="How the stage's shards fan out (STILLHOUSE_PROMPTS_FANOUT__*): in this process, or "
        "over a Ray cluster's CPU workers for large inputs.",
    )
