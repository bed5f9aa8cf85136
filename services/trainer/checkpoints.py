"""Training checkpoints in object storage, and resuming from the newest one.

A checkpoint is an artifact `{checkpoints_prefix}/step-00000123` (committed whole or not at all by its
manifest) holding:

- ``model.pt``: the full model state dict (gathered from every rank under FSDP);
- ``optimizer.pt``: the full optimizer state dict, keyed by parameter name;
- ``training_state.pt``: where training stands (`TrainingPosition`), the learning-rate scheduler, the
  random number generator states of every rank, and the progress log so far.

Only committed checkpoints count: a crash while one is uploading leaves files without a manifest, which
the next pruning deletes. After each new checkpoint all but the newest `keep` are deleted (the manifest
first, so a checkpoint stops being visible before its files go).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from stillhouse.common.datasets.artifacts import (
    MANIFEST_NAME,
    download_artifact,
    list_artifacts,
    upload_folder,
)
from stillhouse.common.objectstore.objects import ObjectStore

_NAME = re.compile(r"^step-(\d{8})$")


@dataclass(frozen=True)
class TrainingPosition:
    """Where training stands after `step` optimizer steps: the next step is batch `batch_in_epoch` of
    epoch `epoch` (0-based), and `tokens` tokens have been trained on (over all workers)."""

    step: int
    epoch: int
    batch_in_epoch: int
    tokens: int


@dataclass
class Checkpoint:
    position: TrainingPosition
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    rng_states: list[dict[str, Any]]  # one per rank
    training_log: list[dict[str, Any]]  # the progress records so far


def checkpoint_prefix(checkpoints_prefix: str, step: int) -> str:
    return f"{checkpoints_prefix}/step-{step:08d}"


def committed_steps(store: ObjectStore, checkpoints_prefix: str) -> list[int]:
    """Steps of the committed checkpoints, oldest first."""
    steps = []
    for artifact_id in list_artifacts(store, f"{checkpoints_prefix}/"):
        match = _NAME.match(artifact_id.removeprefix(f"{checkpoints_prefix}/"))
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_step(store: ObjectStore, checkpoints_prefix: str) -> int | None:
    steps = committed_steps(store, checkpoints_prefix)
    return steps[-1] if steps else None


def save_checkpoint(
    store: ObjectStore, checkpoints_prefix: str, checkpoint: Checkpoint, work_dir: Path, *, keep: int
) -> str:
    """Write, upload and commit `checkpoint`, then prune to the newest `keep`. Returns its prefix; a
    checkpoint already committed for the same step is left as it is."""
    prefix = checkpoint_prefix(checkpoints_prefix, checkpoint.position.step)
    if checkpoint.position.step not in committed_steps(store, checkpoints_prefix):
        folder = work_dir / f"checkpoint-{checkpoint.position.step:08d}"
        folder.mkdir(parents=True)
        torch.save(checkpoint.model_state, folder / "model.pt")
        torch.save(checkpoint.optimizer_state, folder / "optimizer.pt")
        torch.save(
            {
                "position": asdict(checkpoint.position),
                "scheduler": checkpoint.scheduler_state,
                "rng_states": checkpoint.rng_states,
                "training_log": checkpoint.training_log,
            },
            folder / "training_state.pt",
        )
        upload_folder(store, prefix, folder, lineage={"stage": "train", "step": checkpoint.position.step})
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    prune_checkpoints(store, checkpoints_prefix, keep)
    return prefix


def load_checkpoint(store: ObjectStore, checkpoints_prefix: str, step: int, work_dir: Path) -> Checkpoint:
    folder = work_dir / f"resume-{step:08d}"
    download_artifact(store, checkpoint_prefix(checkpoints_prefix, step), folder)
    state = torch.load(folder / "training_state.pt", weights_only=True)
    return Checkpoint(
        position=TrainingPosition(**state["position"]),
        model_state=torch.load(folder / "model.pt", weights_only=True, mmap=True),
        optimizer_state=torch.load(folder / "optimizer.pt", weights_only=True),
        scheduler_state=state["scheduler"],
        rng_states=state["rng_states"],
        training_log=state["training_log"],
    )


def prune_checkpoints(store: ObjectStore, checkpoints_prefix: str, keep: int) -> None:
    """Delete every checkpoint but the newest `keep` committed ones, and the files of uncommitted ones
    (left by a crash during an upload: nothing else writes checkpoints while this runs)."""
    kept = {
        checkpoint_prefix(checkpoints_prefix, step) + "/"
        for step in committed_steps(store, checkpoints_prefix)[-keep:]
    }
    doomed: dict[str, list[str]] = {}
    for info in store.list(f"{checkpoints_prefix}/"):
        folder = info.key[: info.key.index("/", len(checkpoints_prefix) + 1) + 1]
        if folder not in kept:
            doomed.setdefault(folder, []).append(info.key)
    for folder, keys in doomed.items():
        manifest = folder + MANIFEST_NAME
        if manifest in keys:
            store.delete([manifest])
        store.delete([key for key in keys if key != manifest])


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
