"""Which layers a depth-pruned student keeps: Block Influence measured on a real tiny Llama whose layers
are made to matter more or less, on answers written by the local teacher backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stillhouse.trainer.calibration import CalibrationText
from stillhouse.trainer.layer_influence import (
    LayerChoice,
    block_influence,
    evenly_spread_layers,
    most_influential_layers,
)

LAYERS = 6


@pytest.fixture
def teacher(tmp_path: Path, tiny_llama) -> Path:
    return tiny_llama(tmp_path / "teacher", layers=LAYERS, seed=3)


@pytest.fixture
def rows(teacher: Path, calibration_rows) -> list[dict]:
    return calibration_rows(teacher)


def load(folder: Path, quiet_layers: tuple[int, ...] = (), scale: dict[int, float] | None = None):
    """The model in `folder`; each layer of `quiet_layers` adds nothing to the residual stream (its
    attention and MLP outputs are zero, so its output is its input); `scale` multiplies the output
    projections of the layers it names."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        for index, factor in {**{i: 0.0 for i in quiet_layers}, **(scale or {})}.items():
            layer = model.model.layers[index]
            layer.self_attn.o_proj.weight.mul_(factor)
            layer.mlp.down_proj.weight.mul_(factor)
    return model


def ids(folder: Path) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return torch.tensor([tokenizer.encode("The sea is wide and the rain is warm.")])


def test_a_layer_that_changes_nothing_has_no_influence(teacher: Path):
    model = load(teacher, quiet_layers=(2, 4))
    influence = block_influence(model.model.layers, lambda: model(input_ids=ids(teacher)))
    assert len(influence) == LAYERS
    assert influence[2] == pytest.approx(0, abs=1e-6) and influence[4] == pytest.approx(0, abs=1e-6)
    assert all(influence[i] > 1e-4 for i in (0, 1, 3, 5))
    # The hooks are gone: another pass records nothing more.
    again = block_influence(model.model.layers, lambda: model(input_ids=ids(teacher)))
    assert again == pytest.approx(influence)


def test_influence_grows_with_what_a_layer_adds(teacher: Path):
    weak = load(teacher, scale={3: 0.1})
    strong = load(teacher, scale={3: 10.0})
    weak_influence = block_influence(weak.model.layers, lambda: weak(input_ids=ids(teacher)))
    strong_influence = block_influence(strong.model.layers, lambda: strong(input_ids=ids(teacher)))
    assert strong_influence[3] > weak_influence[3]


def test_no_position_reaching_the_layers_is_an_error(teacher: Path):
    model = load(teacher)
    with pytest.raises(ValueError, match="no calibration position"):
        block_influence(model.model.layers, lambda: None)


def test_the_first_and_last_layers_stay_and_the_most_influential_others_join_them():
    influence = [0.9, 0.1, 0.5, 0.05, 0.5, 0.3, 0.8]
    assert most_influential_layers(influence, 2) == [0, 6]
    assert most_influential_layers(influence, 3) == [0, 2, 6]  # a tie goes to the lower index
    assert most_influential_layers(influence, 4) == [0, 2, 4, 6]
    assert most_influential_layers(influence, 6) == [0, 1, 2, 4, 5, 6]
    assert most_influential_layers(influence, 1) == [0]
    # The ends stay even when they change the least.
    assert most_influential_layers([0.0, 1.0, 2.0, 0.0], 2) == [0, 3]
    for bad in (0, 7, 8):
        with pytest.raises(ValueError, match=r"between 1 and 6 \(the teacher has 7 decoder layers\)"):
            most_influential_layers(influence, bad)


def test_influence_choice_drops_the_layers_that_change_nothing(teacher: Path, rows: list[dict]):
    model = load(teacher, quiet_layers=(1, 3))
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    summed = []

    def total(figures: list[float]) -> list[float]:
        summed.append(figures)
        return figures

    choice = LayerChoice("influence", CalibrationText(iter(rows), 256), total)
    assert choice(model, tokenizer, 4) == [0, 2, 4, 5] == choice.kept
    # One sum over the workers: each layer's total, then each layer's positions.
    assert len(summed) == 1 and len(summed[0]) == 2 * LAYERS


def test_every_worker_keeps_the_layers_of_the_influence_summed_over_the_workers(
    teacher: Path, rows: list[dict]
):
    """What `total` returns (the sums over the workers) decides, not this worker's own figures."""
    model = load(teacher, quiet_layers=(1, 3))
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    others = [1.0, 9.0, 1.0, 9.0, 1.0, 1.0] + [10.0] * LAYERS
    others_disagree = LayerChoice("influence", CalibrationText(iter(rows), 256), lambda own: others)
    assert others_disagree(model, tokenizer, 4) == [0, 1, 3, 5]


def test_two_workers_each_measuring_half_the_text_rank_as_one_measuring_all(teacher: Path, rows: list[dict]):
    model = load(teacher, scale={1: 0.3, 4: 2.0})
    tokenizer = AutoTokenizer.from_pretrained(teacher)

    def influence(worker: int, workers: int, total) -> list[float]:
        calibration = CalibrationText(iter(rows), 256, worker=worker, workers=workers)
        return block_influence(model.model.layers, calibration.runner(model, tokenizer, "a test"), total)

    second_worker = []
    influence(1, 2, lambda own: second_worker.append(own) or own)
    both = influence(
        0, 2, lambda own: [mine + theirs for mine, theirs in zip(own, second_worker[0], strict=True)]
    )
    alone = influence(0, 1, list)
    assert both == pytest.approx(alone, rel=1e-9)
    assert influence(0, 2, list) != pytest.approx(alone, rel=1e-6)  # half the text alone measures otherwise


def test_calibration_stops_at_its_token_budget(teacher: Path, rows: list[dict]):
    model = load(teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    seen = []
    original_forward = model.forward

    def counting_forward(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[1])
        return original_forward(*args, **kwargs)

    model.forward = counting_forward
    four_answers = CalibrationText(iter(rows), 256, max_answers=4, max_tokens=10_000)
    LayerChoice("influence", four_answers, lambda x: x)(model, tokenizer, 3)
    assert len(seen) == 4
    seen.clear()
    thirty_tokens = CalibrationText(iter(rows), 256, max_tokens=30)
    LayerChoice("influence", thirty_tokens, lambda x: x)(model, tokenizer, 3)
    assert sum(seen) == 30
    seen.clear()
    second_of_two = CalibrationText(iter(rows), 256, max_answers=4, max_tokens=10_000, worker=1, workers=2)
    LayerChoice("influence", second_of_two, lambda x: x)(model, tokenizer, 3)
    assert len(seen) == 2


def test_spread_choice_needs_no_data(teacher: Path):
    model = load(teacher)
    no_answers = CalibrationText(iter(()), 256)
    choice = LayerChoice("spread", no_answers, lambda x: pytest.fail("spread averages nothing"))
    assert choice(model, None, 3) == evenly_spread_layers(LAYERS, 3) == [0, 2, 5] == choice.kept


def test_influence_without_answers_is_a_clear_error(teacher: Path):
    model = load(teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    with pytest.raises(ValueError, match="no training answer to calibrate on"):
        LayerChoice("influence", CalibrationText(iter(()), 256), lambda x: x)(model, tokenizer, 3)
