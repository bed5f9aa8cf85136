"""Where Ray Train keeps a run's own state (its run folders and results; Stillhouse's checkpoints are
separate, under the run's `checkpoints/`). Every node of a run must see the same storage: a path the
trainer was given (a shared folder), or else the job's folder in object storage,
`jobs/<job-id>/train/ray/`, which is deleted with the job's other bytes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs

from stillhouse.common.objectstore.settings import ObjectStoreSettings

RAY_TRAIN_FOLDER = "ray"
DEFAULT_REGION = "us-east-1"


@dataclass(frozen=True)
class RayTrainStorage:
    path: str
    filesystem: pyarrow.fs.FileSystem | None = None  # None: a path on each node's own filesystem


def ray_train_storage(
    given_path: str | None, store: ObjectStoreSettings, output_prefix: str
) -> RayTrainStorage:
    """`given_path` when set; otherwise the run's folder in `store`."""
    if given_path:
        return RayTrainStorage(given_path)
    key = f"{output_prefix}/{RAY_TRAIN_FOLDER}"
    if store.backend == "local":
        return RayTrainStorage(str(Path(store.local_root) / store.bucket / key))
    filesystem = pyarrow.fs.S3FileSystem(
        access_key=store.access_key.get_secret_value() if store.access_key else None,
        secret_key=store.secret_key.get_secret_value() if store.secret_key else None,
        endpoint_override=store.endpoint,
        scheme="https" if store.secure else "http",
        region=store.region or DEFAULT_REGION,
    )
    return RayTrainStorage(f"{store.bucket}/{key}", filesystem)
