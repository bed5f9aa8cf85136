"""The published student (`jobs/<job-id>/student`): the trained student's files, with a model card that
carries the evaluation figures.

Artifacts are immutable, so the trained student (`jobs/<job-id>/train/student`) is copied to a new
artifact with its README.md written again; nothing else changes. Publishing is idempotent: once the
published artifact is committed, publishing again does nothing.
"""

from __future__ import annotations

import posixpath
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from stillhouse.common.datasets.artifacts import (
    MANIFEST_NAME,
    ArtifactExists,
    download_artifact,
    upload_folder,
)
from stillhouse.common.jobspec import TeacherSpec
from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.trainer.model_card import card_settings, evaluation_section, model_card

log = structlog.get_logger(__name__)

MODEL_CARD = "README.md"


def published_card(card: str, teacher: TeacherSpec, evaluation: Mapping[str, Any]) -> str:
    """The trained student's card written again with `evaluation`. A card that does not keep its
    settings (not written by `model_card`) keeps its text and gains the evaluation section."""
    settings = card_settings(card)
    if settings is None:
        return f"{card.rstrip()}\n\n{evaluation_section(evaluation)}\n".lstrip()
    return model_card(teacher, settings.training, settings.data, evaluation)


def is_committed(store: ObjectStore, artifact_prefix: str) -> bool:
    return store.exists(posixpath.join(artifact_prefix, MANIFEST_NAME))


def publish_student(
    store: ObjectStore,
    student_prefix: str,
    published_prefix: str,
    *,
    teacher: TeacherSpec,
    evaluation: Mapping[str, Any],
    lineage: Mapping[str, Any] | None = None,
    downloaded: Path | None = None,
    parallel_files: int = 4,
) -> bool:
    """Copy the student artifact at `student_prefix` to `published_prefix` with its card written again
    (`published_card`). `downloaded`: a verified local copy of the student artifact that may be changed
    (its README.md is rewritten in place), to save downloading it again. True if this call published it;
    False if it was already committed."""
    if is_committed(store, published_prefix):
        return False
    with tempfile.TemporaryDirectory(prefix="stillhouse-publish-") as scratch:
        folder = downloaded
        if folder is None:
            folder = Path(scratch) / "student"
            download_artifact(store, student_prefix, folder, parallel_files=parallel_files)
        card_path = folder / MODEL_CARD
        card = card_path.read_text(encoding="utf-8") if card_path.is_file() else ""
        card_path.write_text(published_card(card, teacher, evaluation), encoding="utf-8")
        try:
            upload_folder(store, published_prefix, folder, lineage=lineage, parallel_files=parallel_files)
        except ArtifactExists:  # published by a concurrent run of the same evaluation
            return False
    log.info("student published", source=student_prefix, published=published_prefix)
    return True
