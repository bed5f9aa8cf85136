"""Model references: malformed ones are refused by the job spec naming the field; local ones are read
under the models root only, resolved first so that neither `..` nor a link leads out of it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from stillhouse.common.jobspec import DistillationJob
from stillhouse.common.models.locator import ModelLocator
from stillhouse.common.models.model_loading import EMBEDDED_TEACHER
from stillhouse.common.models.references import ModelReferenceRefused
from stillhouse.common.models.settings import ModelSettings
from stillhouse.common.objectstore.settings import ObjectStoreSettings

FIELD = "spec.student.init.pretrained"


def job(teacher_model: str, pretrained: str | None = None) -> dict:
    init = {"pretrained": pretrained} if pretrained else {"pruneTeacherDepth": 1}
    return {
        "apiVersion": "stillhouse.dev/v1",
        "kind": "DistillationJob",
        "spec": {
            "teacher": {"backend": "local", "model": teacher_model},
            "student": {"init": init},
            "training": {"loss": {"kind": "sft"}},
        },
    }


@pytest.mark.parametrize(
    ("reference", "complaint"),
    [
        ("s3://Models/qwen", "the bucket must be 3-63 lower-case letters"),
        ("s3://models", "names a whole bucket"),
        ("s3://models/", "names a whole bucket"),
        ("s3://models/a/../../b", "'.', '..' and empty path segments are not allowed"),
        ("s3://models/a//b", "'.', '..' and empty path segments are not allowed"),
        ("/models/../etc/passwd", "'.', '..' and empty path segments are not allowed"),
        ("https://huggingface.co/Qwen/Qwen2.5-0.5B", "the only URL scheme for a model is s3://"),
        ("/models/qwen\n", "control characters and backslashes are not allowed"),
        ("models\\qwen", "control characters and backslashes are not allowed"),
    ],
)
@pytest.mark.parametrize("field", ["teacher.model", "student.init.pretrained"])
def test_a_malformed_model_reference_is_refused_naming_the_field(reference: str, complaint: str, field):
    document = job(reference) if field == "teacher.model" else job(EMBEDDED_TEACHER, reference)
    with pytest.raises(ValidationError) as refused:
        DistillationJob.model_validate(document)
    assert f"{field}: " in str(refused.value)
    assert complaint in str(refused.value)


def test_well_formed_references_are_accepted():
    spec = DistillationJob.model_validate(job("s3://models/team/qwen2.5-0.5b/", "/models/qwen")).spec
    assert spec.teacher.model == "s3://models/team/qwen2.5-0.5b/"
    assert DistillationJob.model_validate(job(EMBEDDED_TEACHER)).spec.teacher.model == EMBEDDED_TEACHER


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "models" / "qwen").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "models" / "escape").symlink_to(tmp_path / "elsewhere")
    return tmp_path / "models"


def locator(root: Path | None, tmp_path: Path) -> ModelLocator:
    return ModelLocator(
        ModelSettings(root=root, cache_dir=tmp_path / "cache"),
        ObjectStoreSettings(backend="local", local_root=tmp_path / "objects"),
    )


def refusal(locate: ModelLocator, reference: str) -> str:
    with pytest.raises(ModelReferenceRefused) as refused:
        locate.locate(reference, FIELD)
    assert refused.value.field == FIELD
    return refused.value.message


def test_a_local_model_is_read_under_the_models_root_only(root: Path, tmp_path: Path):
    models = locator(root, tmp_path)

    assert models.locate(str(root / "qwen"), FIELD) == str(root.resolve() / "qwen")
    assert "is outside the models root" in refusal(models, str(tmp_path / "elsewhere"))
    assert "is outside the models root" in refusal(models, str(root / "escape"))  # a link out
    assert "is outside the models root" in refusal(models, "/etc")


def test_under_a_models_root_a_relative_reference_names_a_distribution_only(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    models = locator(root, tmp_path)
    monkeypatch.chdir(root)

    assert models.locate(EMBEDDED_TEACHER, FIELD) == EMBEDDED_TEACHER
    assert "is a relative path" in refusal(models, "qwen")
    assert "is a relative path" in refusal(models, "~/models/qwen")


def test_without_a_models_root_local_paths_are_given_as_they_are(root: Path, tmp_path: Path):
    assert locator(None, tmp_path).locate(str(tmp_path / "elsewhere"), FIELD) == str(tmp_path / "elsewhere")
