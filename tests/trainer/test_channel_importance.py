"""Which MLP channels a width-pruned student keeps: activation-based importance measured on a real tiny
Llama whose channels are made to matter more or less, on answers written by the local teacher backend,
and once on the real SmolLM2 teacher (slow), where it must beat both a random choice and the ranking by
weight norms."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stillhouse.common.models.model_loading import (
    EMBEDDED_TEACHER,
    load_model,
    load_tokenizer,
    resolve_model_reference,
)
from stillhouse.trainer.calibration import CalibrationText
from stillhouse.trainer.channel_importance import ChannelRanking, mlp_channel_importance
from stillhouse.trainer.student_init import prune_width

LAYERS = 3
WIDTH = 128  # the tiny Llama's intermediate size


@pytest.fixture
def teacher(tmp_path: Path, tiny_llama) -> Path:
    return tiny_llama(tmp_path / "teacher", layers=LAYERS, seed=5)


def importance_of(model, text: str = "The sea is wide and the rain is warm.") -> list[torch.Tensor]:
    ids = torch.tensor([AutoTokenizer.from_pretrained(model.name_or_path).encode(text)])
    return mlp_channel_importance(model.model.layers, lambda: model(input_ids=ids))


def test_importance_is_mean_absolute_activation_times_the_output_weights_norm(teacher: Path):
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    ids = torch.tensor(
        [AutoTokenizer.from_pretrained(teacher).encode("The sea is wide and the rain is warm.")]
    )
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    importance = importance_of(model)
    assert [len(layer) for layer in importance] == [WIDTH] * LAYERS
    for index, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        with torch.no_grad():
            # The MLP's input: the layer's input after attention and the post-attention norm.
            residual = hidden[index]
            attended = (
                residual
                + layer.self_attn(
                    layer.input_layernorm(residual),
                    position_embeddings=model.model.rotary_emb(residual, torch.arange(ids.shape[1])[None]),
                    attention_mask=None,
                )[0]
            )
            x = layer.post_attention_layernorm(attended)
            activations = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        expected = activations.abs().mean(dim=(0, 1)) * mlp.down_proj.weight.norm(dim=0)
        torch.testing.assert_close(importance[index], expected, rtol=1e-4, atol=1e-7)


def test_a_channel_that_adds_nothing_ranks_last_and_one_that_adds_more_ranks_higher(teacher: Path):
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    before = importance_of(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, 7] = 0  # channel 7 of layer 1 adds nothing
        model.model.layers[1].mlp.up_proj.weight[9] *= 10  # channel 9's activation is 10 times larger
    after = importance_of(model)
    assert after[1][7] == 0 and int(after[1].argmin()) == 7
    torch.testing.assert_close(after[1][9], 10 * before[1][9], rtol=1e-4, atol=0)
    # Layer 0 comes before the change and is untouched.
    torch.testing.assert_close(after[0], before[0])
    # The hooks are gone: another pass records nothing more.
    torch.testing.assert_close(importance_of(model)[1], after[1])


def test_no_position_reaching_the_mlps_is_an_error(teacher: Path):
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with pytest.raises(ValueError, match="no calibration position reached the MLPs"):
        mlp_channel_importance(model.model.layers, lambda: None)


def test_every_worker_keeps_the_channels_of_the_importance_summed_over_the_workers(
    teacher: Path, calibration_rows
):
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    summed = []
    norms = torch.cat([layer.mlp.down_proj.weight.detach().norm(dim=0) for layer in model.model.layers])

    def others_disagree(own: list[float]) -> list[float]:
        summed.append(own)
        # Each channel's total activation, then each layer's positions, such that the last channels of
        # each layer matter most once multiplied by their output weights' norms.
        importance = torch.arange(LAYERS * WIDTH) % WIDTH + 1.0
        return (importance / norms).tolist() + [1.0] * LAYERS

    calibration = CalibrationText(iter(calibration_rows(teacher)), 256)
    ranking = ChannelRanking(calibration, others_disagree)(model, tokenizer)
    assert len(summed) == 1 and len(summed[0]) == LAYERS * WIDTH + LAYERS and min(summed[0]) > 0
    assert [len(layer) for layer in ranking] == [WIDTH] * LAYERS
    prune_width(model, 0.5, ranking)
    for layer in model.model.layers:
        assert layer.mlp.up_proj.out_features == WIDTH // 2
    original = AutoModelForCausalLM.from_pretrained(teacher)
    torch.testing.assert_close(
        model.model.layers[2].mlp.up_proj.weight, original.model.layers[2].mlp.up_proj.weight[WIDTH // 2 :]
    )


def test_two_workers_each_measuring_half_the_text_rank_as_one_measuring_all(teacher: Path, calibration_rows):
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    rows = calibration_rows(teacher)

    def importance(worker: int, workers: int, total) -> torch.Tensor:
        calibration = CalibrationText(iter(rows), 256, worker=worker, workers=workers)
        run_model = calibration.runner(model, tokenizer, "a test")
        return torch.cat(mlp_channel_importance(model.model.layers, run_model, total))

    second_worker = []
    importance(1, 2, lambda own: second_worker.append(own) or own)
    both = importance(
        0, 2, lambda own: [mine + theirs for mine, theirs in zip(own, second_worker[0], strict=True)]
    )
    alone = importance(0, 1, list)
    torch.testing.assert_close(both, alone, rtol=1e-5, atol=0)
    assert not torch.allclose(importance(0, 2, list), alone, rtol=1e-3)  # half the text alone differs


def test_ranking_without_answers_is_a_clear_error(teacher: Path):
    model = AutoModelForCausalLM.from_pretrained(teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    with pytest.raises(ValueError, match="pruneTeacherWidth found no training answer to calibrate on"):
        ChannelRanking(CalibrationText(iter(()), 256), lambda x: x)(model, tokenizer)


# --- the real embedded teacher -------------------------------------------------------------------------

CALIBRATION = [
    "A hash table stores each key in a bucket chosen by the key's hash, so a lookup needs one probe.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the leaves.",
    "Explain recursion to a child: a function that solves a small piece and calls itself for the rest.",
    "The French Revolution began in 1789 and ended the absolute monarchy of Louis XVI.",
]
HELD_OUT = [
    "A binary search tree keeps its keys in order, so finding one takes logarithmic time.",
    "Rain forms when water vapour cools, condenses on dust and falls as drops too heavy to float.",
]


def held_out_kl(teacher, student, tokenizer) -> float:
    """Mean next-token KL(teacher || student) in nats over the held-out sentences' positions."""
    total, positions = 0.0, 0
    with torch.no_grad():
        for text in HELD_OUT:
            ids = torch.tensor([tokenizer.encode(text)])
            reference = torch.log_softmax(teacher(input_ids=ids).logits.float(), dim=-1)
            pruned = torch.log_softmax(student(input_ids=ids).logits.float(), dim=-1)
            total += (reference.exp() * (reference - pruned)).sum().item()
            positions += ids.shape[1]
    return total / positions


@pytest.mark.slow
def test_on_smollm2_activation_ranking_beats_random_channels_and_weight_norms():
    source = resolve_model_reference(EMBEDDED_TEACHER)
    teacher = load_model(source, device=torch.device("cpu"), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(source)
    sequences = [tokenizer.encode(text) for text in CALIBRATION]

    def run_teacher() -> None:
        for ids in sequences:
            teacher(input_ids=torch.tensor([ids]))

    generator = torch.Generator().manual_seed(0)
    rankings = {
        "activation": mlp_channel_importance(teacher.model.layers, run_teacher),
        "random": [
            torch.rand(layer.mlp.down_proj.in_features, generator=generator) for layer in teacher.model.layers
        ],
        "weight norms": [
            layer.mlp.gate_proj.weight.norm(dim=1)
            * layer.mlp.up_proj.weight.norm(dim=1)
            * layer.mlp.down_proj.weight.norm(dim=0)
            for layer in teacher.model.layers
        ],
    }
    kl = {}
    for name, ranking in rankings.items():
        student = copy.deepcopy(teacher)
        prune_width(student, 0.5, ranking)
        kl[name] = held_out_kl(teacher, student, tokenizer)
    assert kl["activation"] < kl["random"] / 3 and kl["activation"] < kl["weight norms"] / 3, kl
