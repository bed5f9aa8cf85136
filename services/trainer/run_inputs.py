"""A run's inputs in object storage, checked before any Ray work: a dataset that is not there, or a model
artifact that was never committed, fails the run at once, naming the request field that points at it."""

from __future__ import annotations

from stillhouse.common.datasets.artifacts import read_artifact_manifest
from stillhouse.common.datasets.store import DatasetNotFound, DatasetReader
from stillhouse.common.objectstore.objects import ObjectNotFound, ObjectStore, ObjectStoreError
from stillhouse.trainer.failures import FailureKind, RunFailure
from stillhouse.trainer.run_config import EvaluateRun


def require_dataset(store: ObjectStore, field: str, dataset_id: str) -> None:
    try:
        DatasetReader(store, dataset_id)
    except DatasetNotFound as exc:
        raise RunFailure(f"{field}: {exc}", FailureKind.USER_FIXABLE) from exc
    except ObjectStoreError as exc:
        raise RunFailure(f"object storage: {exc}", FailureKind.UNAVAILABLE) from exc


def require_artifact(store: ObjectStore, field: str, prefix: str) -> None:
    try:
        read_artifact_manifest(store, prefix)
    except ObjectNotFound as exc:
        raise RunFailure(f"{field}: no committed artifact {prefix!r}", FailureKind.USER_FIXABLE) from exc


def require_evaluation_inputs(store: ObjectStore, run: EvaluateRun) -> None:
    """The held-out and training answers, and every model the evaluation runs (with the SFT control when
    `evaluation.controls` lists it)."""
    require_dataset(store, "holdout_answers", run.holdout_dataset_id)
    require_dataset(store, "training_answers", run.training_dataset_id)
    models = {"student": run.student_prefix, "baseline": run.baseline_prefix}
    if run.control_sft_prefix is not None:
        models["control-sft"] = run.control_sft_prefix
    for name, prefix in models.items():
        require_artifact(store, name, prefix)
