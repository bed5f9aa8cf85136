"""The curve a training run hands back: each logged step's loss figures, thinned evenly for a long run."""

from __future__ import annotations

import itertools

import pytest

from stillhouse.trainer.training_curve import CURVE_METRICS, training_curve


def _log(steps: int, model: str = "student") -> list[dict]:
    return [
        {
            "model": model,
            "step": float(step),
            "loss": 10 / step,
            "kd": 5 / step,
            "ce": 1.0,
            "learning_rate": 1e-3,
            "tokens_per_second": 100.0,
        }
        for step in range(1, steps + 1)
    ]


def test_every_logged_step_is_on_a_short_runs_curve_with_the_loss_figures_only():
    curve = training_curve(_log(7))

    assert [point.step for point in curve] == list(range(1, 8))
    assert all(set(point.metrics) == set(CURVE_METRICS) and point.model == "student" for point in curve)
    assert curve[3].metrics["loss"] == pytest.approx(10 / 4)


@pytest.mark.parametrize(("steps", "limit"), [(1000, 100), (101, 100), (5000, 400)])
def test_a_long_runs_curve_is_thinned_evenly_keeping_its_first_and_last_step(steps: int, limit: int):
    curve = training_curve(_log(steps), limit=limit)

    kept = [point.step for point in curve]
    assert len(kept) == limit and kept[0] == 1 and kept[-1] == steps
    assert kept == sorted(set(kept))
    gaps = [later - earlier for earlier, later in itertools.pairwise(kept)]
    assert max(gaps) - min(gaps) <= 1  # evenly: no stretch of the run left out


def test_each_logged_model_keeps_its_name_and_entries_without_a_step_are_left_out():
    log = [*_log(2), {"message": "no step here"}, *_log(3, model="control-sft")]

    curve = training_curve(log)

    assert [(point.model, point.step) for point in curve] == [
        ("student", 1),
        ("student", 2),
        ("control-sft", 1),
        ("control-sft", 2),
        ("control-sft", 3),
    ]
