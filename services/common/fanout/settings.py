"""How a stage service fans its stage out over Ray (nested `fanout` settings of the teacher and prompts
services: STILLHOUSE_TEACHER_FANOUT__*, STILLHOUSE_PROMPTS_FANOUT__*)."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from stillhouse.common.ray.settings import RayClusterAccess


class FanoutSettings(RayClusterAccess):
    model_config = ConfigDict(extra="forbid")

    ray_address: str | None = Field(
        default=None,
        description="Job-submission (dashboard) address of the Ray cluster whose CPU workers run the shards, "
        "e.g. http://raycluster-head-svc:8265; unset: every stage runs in this process.",
    )
    ray_python: str = Field(default="python", description="Python interpreter of the Ray job's driver.")
    min_rows: int = Field(
        default=20_000, ge=0, description="Stages with fewer input rows than this run in this process."
    )
    shard_rows: int = Field(default=10_000, ge=100, le=10_000_000, description="Input rows per shard.")
    max_shards: int = Field(
        default=4096,
        ge=1,
        le=65_536,
        description="Shards per stage at most; larger inputs get larger shards.",
    )
    max_parallel_shards: int = Field(
        default=0,
        ge=0,
        le=10_000,
        description="Shards running at once; 0: as many as the cluster's CPUs take.",
    )
    cpus_per_shard: float = Field(default=1.0, gt=0, le=64, description="Ray CPUs one shard task reserves.")
    shard_resource: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$",
        description="A custom Ray resource that only the CPU workers have; each shard task asks for "
        "`cpus_per_shard` of it too, so shards run on those workers (and the autoscaler starts them for "
        "pending shards) rather than on the head or GPU workers. Unset: any node with free CPUs.",
    )
    max_retries: int = Field(
        default=3,
        ge=0,
        le=20,
        description="Times a shard is retried after its worker died or it failed unexpectedly; a shard "
        "resumes from what it committed and from the teacher cache.",
    )
