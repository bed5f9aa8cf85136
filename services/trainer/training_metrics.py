"""The Prometheus metrics of training, as the trainer reads them from its Ray jobs' progress records:
the latest loss and tokens per second of the model being trained, and the steps taken.

The model label is what is trained: the student, or the SFT-only control; anything else a record names
counts as "other". With several trainings at once, the gauges hold the latest record of any of them.
"""

from __future__ import annotations

from collections.abc import Mapping

import prometheus_client

TRAINED_MODELS = frozenset({"student", "control-sft"})

TRAINING_LOSS = prometheus_client.Gauge(
    "stillhouse_training_loss", "Loss of the latest training step reported, by model.", ["model"]
)
TRAINING_TOKENS_PER_SECOND = prometheus_client.Gauge(
    "stillhouse_training_tokens_per_second",
    "Training throughput of the latest step reported, over all workers, by model.",
    ["model"],
)
TRAINING_STEPS = prometheus_client.Counter(
    "stillhouse_training_steps_total", "Training steps reported by the Ray jobs, by model.", ["model"]
)


def step_reported(model: str, figures: Mapping[str, float]) -> None:
    label = model if model in TRAINED_MODELS else "other"
    TRAINING_STEPS.labels(label).inc()
    if "loss" in figures:
        TRAINING_LOSS.labels(label).set(figures["loss"])
    if "tokens_per_second" in figures:
        TRAINING_TOKENS_PER_SECOND.labels(label).set(figures["tokens_per_second"])
