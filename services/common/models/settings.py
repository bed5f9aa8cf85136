"""Where a service finds model weights: the `models` section of the teacher's and the trainer's settings,
which the trainer hands on to its Ray workers with each run."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from stillhouse.common.paths import stillhouse_home

GIB = 1024**3


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cache_dir: Path = Field(
        default_factory=lambda: stillhouse_home() / "model-cache",
        description="Where models named s3://<bucket>/<prefix> are downloaded, one folder per model "
        "version; processes sharing it download each version once.",
    )
    root: Path | None = Field(
        default=None,
        description="The only folder local model paths may lead into (a mounted volume on a cluster); "
        "unset, any local path may be loaded (embedded mode, where the user owns the machine).",
    )
    max_download_bytes: int = Field(
        default=200 * GIB,
        gt=0,
        le=10 * 1024 * GIB,
        description="Largest model (all its objects together) downloaded from object storage.",
    )
    max_download_files: int = Field(
        default=10_000, gt=0, le=1_000_000, description="Most objects one model folder may hold."
    )
