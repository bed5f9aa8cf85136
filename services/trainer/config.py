"""Settings of the trainer service (environment variables STILLHOUSE_TRAINER_*)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from stillhouse.common.config import GrpcServiceSettings, settings_config
from stillhouse.common.models.settings import ModelSettings
from stillhouse.common.paths import stillhouse_home
from stillhouse.common.ray.settings import LocalRaySettings, RayClusterAccess


class TrainerSettings(RayClusterAccess, GrpcServiceSettings):
    model_config = settings_config("STILLHOUSE_TRAINER_")

    port: int = 50054
    ray_address: str | None = Field(
        default=None,
        description="Job-submission (dashboard) address of a Ray cluster, e.g. http://raycluster-head:8265; "
        "unset starts a local Ray head on first use.",
    )
    ray_storage_path: str | None = Field(
        default=None,
        description="Ray Train's storage_path, a folder every Ray node shares; unset: "
        "`<local_ray.temp_dir>/train` for the local head, the run's `ray/` folder in object storage on "
        "a cluster.",
    )
    ray_python: str | None = Field(
        default=None,
        description="Python interpreter of Ray jobs; unset: this service's own for the local head, "
        "`python` on a cluster.",
    )
    local_ray: LocalRaySettings = Field(default_factory=LocalRaySettings)
    evaluation_num_gpus: float = Field(default=0, ge=0, description="GPUs of the evaluation task.")
    evaluation_num_cpus: int | None = Field(
        default=None,
        gt=0,
        le=1024,
        description="CPUs of the evaluation task, which computes with as many threads; unset: every CPU of "
        "a local Ray head (the evaluation then waits for the head to be free), one on a cluster.",
    )
    models: ModelSettings = Field(
        default_factory=ModelSettings,
        description="Where model weights are (models root, download cache), for this service's checks and "
        "for the runs it hands to Ray, whose nodes must see the same folders.",
    )
    preflight_dir: Path = Field(
        default_factory=lambda: stillhouse_home() / "preflight",
        description="Where the submit-time check keeps the tokenizers and configs it fetches from object "
        "storage (never weights).",
    )
