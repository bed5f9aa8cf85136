"""How the progress records a run prints (`ray_entrypoint.print_progress`) show in its operation's
progress: training by steps, with the loop's figures; evaluation by held-out answers run."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from stillhouse.trainer.training_metrics import step_reported

if TYPE_CHECKING:
    from stillhouse.common.operations import ProgressReporter

PROGRESS_METRICS = ("loss", "kd", "ce", "learning_rate", "tokens_per_second", "tokens", "epoch")

OnRecord = Callable[[dict[str, Any]], None]


def train_progress(progress: ProgressReporter) -> OnRecord:
    def on_record(record: dict[str, Any]) -> None:
        if record.get("kind") == "train" and "step" in record:
            step = int(record["step"])
            metrics = {name: float(record[name]) for name in PROGRESS_METRICS if name in record}
            model = str(record.get("model", "student"))
            step_reported(model, metrics)
            progress.update(done=step, message=f"training the {model}: step {step}", metrics=metrics)
        elif "message" in record:
            progress.update(message=str(record["message"]))

    return on_record


def evaluate_progress(progress: ProgressReporter) -> OnRecord:
    def on_record(record: dict[str, Any]) -> None:
        if record.get("kind") == "evaluate":
            progress.update(
                done=int(record.get("done", 0)),
                total=int(record.get("total", 0)),
                message=f"evaluating: {record.get('stage', '')}",
            )

    return on_record
