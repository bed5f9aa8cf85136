"""A control plane whose stages are scripted and whose storage service is real (over a local object
store), as the SDK tests see it: where to reach it, where local inputs may be, and how to publish a
student artifact the way the trainer does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stillhouse.common.datasets.artifacts import upload_folder
from stillhouse.common.objectstore.objects import ObjectStore

# A job the scripted stages run through; its teacher and student are never loaded.
JOB = {"spec": {"teacher": {"backend": "local", "model": "m"}, "student": {"init": {"pruneTeacherDepth": 2}}}}
STAGE_SECONDS = 0.6


@dataclass
class Platform:
    url: str
    token: str
    inputs: Path
    store: ObjectStore

    def publish_student(self, job_id: str, files: dict[str, bytes], scratch: Path) -> None:
        """Commit a student artifact where the scripted trainer said it would be, as the trainer does."""
        for path, data in files.items():
            (scratch / path).parent.mkdir(parents=True, exist_ok=True)
            (scratch / path).write_bytes(data)
        upload_folder(self.store, f"jobs/{job_id}/train/student", scratch)
