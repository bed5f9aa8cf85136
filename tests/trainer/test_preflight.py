"""The submit-time checks on real tokenizers and configs made here (no weights): what is refused, what is
only a warning, and what cannot be found; and the embedded demo, which must pass."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from stillhouse.common.datasets.artifacts import upload_folder
from stillhouse.common.jobspec import DistillationJob, DistillationJobSpec
from stillhouse.common.models.model_loading import EMBEDDED_TEACHER, resolve_model_reference
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.objectstore.settings import ObjectStoreSettings
from stillhouse.trainer.preflight import (
    Finding,
    ModelShape,
    PreflightReport,
    architecture_violations,
    capacity_violations,
)
from stillhouse.trainer.preflight_loading import ModelFactsLoader, gguf_shape

EXAMPLES = Path(__file__).parents[2] / "examples"
OTHER_TEMPLATE = "{% for message in messages %}[{{ message['content'] }}]{% endfor %}"


def job(teacher: Path | str, student: dict, **training) -> DistillationJobSpec:
    return DistillationJobSpec.model_validate(
        {
            "teacher": {"backend": "local", "model": str(teacher)},
            "student": {"init": student},
            "training": {"maxSeqLen": 256, **training},
        }
    )


@pytest.fixture
def settings(tmp_path: Path) -> ObjectStoreSettings:
    return ObjectStoreSettings(backend="local", local_root=tmp_path / "objects")


@pytest.fixture
def loader(settings: ObjectStoreSettings, tmp_path: Path) -> ModelFactsLoader:
    return ModelFactsLoader(settings, tmp_path / "fetched")


@pytest.fixture
def teacher(tokenizer_only_model, tmp_path: Path) -> Path:
    return tokenizer_only_model(tmp_path / "teacher")


def fields(found: list[Finding]) -> list[str]:
    return [finding.field for finding in found]


def test_a_student_with_the_teachers_tokenizer_passes_clean(loader, teacher, tokenizer_only_model, tmp_path):
    student = tokenizer_only_model(tmp_path / "student")
    assert loader.check(job(teacher, {"pretrained": str(student)})) == PreflightReport()
    assert loader.check(job(teacher, {"pruneTeacherDepth": 1})) == PreflightReport()


@pytest.mark.parametrize(
    ("student_kwargs", "words"),
    [
        ({"extra": ("only-in-the-student",)}, "1 tokens only in the student's"),
        ({"eos": "<s>"}, "end-of-sequence tokens differ"),
    ],
    ids=["vocabulary", "eos"],
)
def test_a_logit_loss_refuses_another_tokenizer_and_sft_does_not(
    loader, teacher, tokenizer_only_model, tmp_path, student_kwargs, words
):
    student = {"pretrained": str(tokenizer_only_model(tmp_path / "student", **student_kwargs))}

    refused = loader.check(job(teacher, student, loss={"kind": "reverse_kl"}))
    assert fields(refused.violations) == ["spec.student.init.pretrained"]
    message = refused.violations[0].message
    assert words in message and "reverse_kl" in message and "fallbackToSft" in message

    falling_back = loader.check(job(teacher, student, loss={"kind": "reverse_kl", "fallbackToSft": True}))
    assert falling_back.violations == []
    assert "falls back to `sft`" in falling_back.warnings[0].message

    assert loader.check(job(teacher, student, loss={"kind": "sft"})).violations == []


def test_a_student_without_a_chat_template_is_refused_and_another_one_is_a_warning(
    loader, teacher, tokenizer_only_model, tmp_path
):
    bare = tokenizer_only_model(tmp_path / "bare", chat_template=None)
    refused = loader.check(job(teacher, {"pretrained": str(bare)}, loss={"kind": "sft"}))
    assert fields(refused.violations) == ["spec.student.init.pretrained"]
    assert "no chat template" in refused.violations[0].message

    other = tokenizer_only_model(tmp_path / "other", chat_template=OTHER_TEMPLATE)
    warned = loader.check(job(teacher, {"pretrained": str(other)}))
    assert warned.violations == []
    assert fields(warned.warnings) == ["spec.student.init.pretrained"]
    assert "chat template differs" in warned.warnings[0].message


def test_a_local_teacher_without_a_chat_template_is_refused(loader, tokenizer_only_model, tmp_path):
    teacher = tokenizer_only_model(tmp_path / "teacher", chat_template=None)
    student = tokenizer_only_model(tmp_path / "student")
    refused = loader.check(job(teacher, {"pretrained": str(student)}))
    assert fields(refused.violations) == ["spec.teacher.model"]
    derived = loader.check(job(teacher, {"pruneTeacherDepth": 1}))
    assert fields(derived.violations) == ["spec.teacher.model"]


def test_max_seq_len_must_fit_the_students_context(loader, tokenizer_only_model, tmp_path):
    teacher = tokenizer_only_model(tmp_path / "teacher", context=128)
    refused = loader.check(job(teacher, {"pruneTeacherDepth": 1}))
    assert fields(refused.violations) == ["spec.training.maxSeqLen"]
    assert "maxSeqLen 256 is longer than the student's context of 128 tokens" in refused.violations[0].message

    widened = {"config": {"max_position_embeddings": 1024}}
    assert loader.check(job(teacher, widened)).violations == []
    assert loader.check(job(teacher, {"pruneTeacherDepth": 1}, maxSeqLen=128)).violations == []


def test_pruning_must_fit_the_teacher(loader, teacher):
    # The teacher made by `tokenizer_only_model` is a 2-layer Llama with an MLP 16 channels wide.
    refused = loader.check(job(teacher, {"pruneTeacherDepth": 2}))
    assert fields(refused.violations) == ["spec.student.init.pruneTeacherDepth"]
    assert "between 1 and 1" in refused.violations[0].message
    narrowed = loader.check(job(teacher, {"pruneTeacherWidth": 0.5}))
    assert narrowed.violations == []
    kept_whole = loader.check(job(teacher, {"pruneTeacherWidth": 0.9}))
    assert fields(kept_whole.violations) == ["spec.student.init.pruneTeacherWidth"]
    assert loader.check(job(teacher, {"pruneTeacherDepth": 1, "pruneTeacherWidth": 0.5})).violations == []
    both_wrong = loader.check(job(teacher, {"pruneTeacherDepth": 2, "pruneTeacherWidth": 0.9}))
    assert fields(both_wrong.violations) == [
        "spec.student.init.pruneTeacherDepth",
        "spec.student.init.pruneTeacherWidth",
    ]


def test_every_named_model_must_be_found(loader, teacher, tmp_path):
    missing = tmp_path / "no-such-model"
    refused = loader.check(job(teacher, {"pretrained": str(missing)}))
    assert fields(refused.violations) == ["spec.student.init.pretrained"]
    assert str(missing) in refused.violations[0].message

    assert fields(loader.check(job(missing, {"pruneTeacherDepth": 1})).violations) == ["spec.teacher.model"]

    api_teacher = DistillationJobSpec.model_validate(
        {
            "teacher": {"backend": "openai", "baseURL": "http://127.0.0.1:1/v1", "model": "m"},
            "student": {"init": {"pretrained": str(teacher)}},
            "training": {"loss": {"kind": "sft"}, "maxSeqLen": 256},
        }
    )
    assert loader.check(api_teacher) == PreflightReport()
    named = api_teacher.model_copy(
        update={"teacher": api_teacher.teacher.model_copy(update={"tokenizer": str(missing)})}
    )
    assert fields(loader.check(named).violations) == ["spec.teacher.tokenizer"]
    absent_store = job(teacher, {"pretrained": "s3://stillhouse/models/absent"})
    absent = loader.check(absent_store).violations[0]
    assert absent.message == "student.init.pretrained: bucket 'stillhouse' does not exist"


def test_an_api_teacher_checks_the_tokenizer_it_names(loader, tokenizer_only_model, tmp_path):
    tokenizer = tmp_path / "tokenizer"
    tokenizer_only_model(tmp_path / "teacher").joinpath("config.json").unlink()
    shutil.move(tmp_path / "teacher", tokenizer)  # a tokenizer folder without a model config
    student = tokenizer_only_model(tmp_path / "student", extra=("more",))
    spec = DistillationJobSpec.model_validate(
        {
            "teacher": {
                "backend": "openai",
                "baseURL": "http://127.0.0.1:1/v1",
                "model": "m",
                "tokenizer": str(tokenizer),
            },
            "student": {"init": {"pretrained": str(student)}},
            "training": {"maxSeqLen": 256},
        }
    )
    refused = loader.check(spec)
    assert fields(refused.violations) == ["spec.student.init.pretrained"]


def test_a_student_in_object_storage_is_checked_without_its_weights(
    loader, settings, teacher, tokenizer_only_model, tmp_path
):
    student = tokenizer_only_model(tmp_path / "student", context=128)
    (student / "model.safetensors").write_bytes(b"weights the check never reads")
    store = open_object_store(settings)
    store.ensure_bucket()
    upload_folder(store, "models/tiny", student)

    refused = loader.check(job(teacher, {"pretrained": "s3://stillhouse/models/tiny"}))

    assert fields(refused.violations) == ["spec.training.maxSeqLen"]
    (model_folder,) = (path for path in (tmp_path / "fetched").iterdir() if path.is_dir())
    (fetched,) = model_folder.iterdir()  # the one version there is
    assert (fetched / "tokenizer.json").is_file()
    assert not (fetched / "model.safetensors").exists()


def test_tokenizers_are_cached_by_reference(loader, teacher, tokenizer_only_model, tmp_path):
    student = tokenizer_only_model(tmp_path / "student")
    spec = job(teacher, {"pretrained": str(student)})
    assert loader.check(spec) == PreflightReport()
    shutil.rmtree(student)
    assert loader.check(spec) == PreflightReport()


def test_a_local_ray_head_must_hold_the_workers():
    assert capacity_violations(8, 1, None) == []
    assert capacity_violations(2, 0, (2, 0)) == []
    assert fields(capacity_violations(2, 1, (4, 1))) == ["spec.training.gpusPerWorker"]
    assert fields(capacity_violations(3, 0, (2, 0))) == ["spec.training.workers"]
    assert capacity_violations(1, 0, (2, 0), cpus_per_worker=2) == []
    (too_many,) = capacity_violations(2, 0, (2, 0), cpus_per_worker=2)
    assert too_many.field == "spec.training.cpusPerWorker" and "asks for 4 CPUs" in too_many.message


def test_the_shape_of_a_gguf_model_is_read_from_its_header():
    source = resolve_model_reference(EMBEDDED_TEACHER)
    shape = gguf_shape(source.folder / source.gguf_file)
    assert shape == ModelShape(model_type="llama", context_length=8192, num_layers=30, intermediate_size=1536)


@pytest.mark.timeout(180)
def test_the_embedded_demo_passes(loader):
    document = yaml.safe_load((EXAMPLES / "smollm2-local.yaml").read_text())
    report = loader.check(DistillationJob.model_validate(document).spec)
    assert report.violations == []


def test_a_student_that_cannot_compute_chosen_logits_is_refused():
    refused = architecture_violations("spec.student.init.pretrained", ModelShape(model_type="whisper"))
    assert fields(refused) == ["spec.student.init.pretrained"]
    assert "logits_to_keep" in refused[0].message
    assert architecture_violations("spec.teacher.model", ModelShape(model_type="llama")) == []
    assert architecture_violations("spec.teacher.model", ModelShape()) == []
