"""The training curve a run hands back with its outcome: each reported step's loss figures and learning
rate, from its training log. The live progress of a job samples its steps (an event a second at most);
this is every step the loop reported, thinned evenly to at most `CURVE_POINT_LIMIT` points (the first
and the last kept) so that a long run reporting often stays small in the job's summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from stillhouse.trainer.run_config import CurvePoint

CURVE_METRICS = ("loss", "kd", "ce", "learning_rate")
CURVE_POINT_LIMIT = 400


def training_curve(log: Sequence[Mapping[str, Any]], limit: int = CURVE_POINT_LIMIT) -> list[CurvePoint]:
    points = [
        CurvePoint(
            model=str(entry.get("model", "student")),
            step=int(entry["step"]),
            metrics={name: float(entry[name]) for name in CURVE_METRICS if name in entry},
        )
        for entry in log
        if "step" in entry
    ]
    if len(points) <= limit:
        return points
    kept = sorted({round(index * (len(points) - 1) / (limit - 1)) for index in range(limit)})
    return [points[index] for index in kept]
