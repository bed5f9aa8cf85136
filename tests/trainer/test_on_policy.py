"""Which steps are on-policy, and the student's generations that those steps train on (a tiny random
Llama with SmolLM2's tokenizer)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoTokenizer

from stillhouse.common.jobspec import LossSpec, OnPolicySpec
from stillhouse.trainer.data import TokenizedAnswer
from stillhouse.trainer.on_policy import (
    generate_responses,
    is_on_policy_step,
    on_policy_loss,
    on_policy_steps,
)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("seed", [0, 7])
def test_the_share_of_on_policy_steps_follows_the_fraction_in_every_window(fraction, seed):
    chosen = [is_on_policy_step(seed, step, fraction) for step in range(200)]
    for start, length in ((0, 200), (0, 10), (37, 23), (150, 50)):
        count = sum(chosen[start : start + length])
        assert math.floor(length * fraction) <= count <= math.ceil(length * fraction)
    assert on_policy_steps(seed, 200, fraction) == sum(chosen)
    assert on_policy_steps(seed, 37, fraction) == sum(chosen[:37])


def test_the_choice_depends_on_the_seed_and_the_step_only():
    first = [is_on_policy_step(3, step, 0.3) for step in range(40)]
    assert first == [is_on_policy_step(3, step, 0.3) for step in range(40)]
    assert first != [is_on_policy_step(4, step, 0.3) for step in range(40)]


def test_on_policy_steps_take_the_divergence_on_full_logits_without_cross_entropy():
    loss = LossSpec.model_validate({"kind": "jsd", "beta": 0.3, "temperature": 2.0, "ceWeight": 0.5})
    on_policy = on_policy_loss(loss)
    assert (on_policy.kind, on_policy.beta, on_policy.temperature) == (loss.kind, 0.3, 2.0)
    assert on_policy.ce_weight == 0.0 and on_policy.teacher_logits == "full"


@pytest.fixture
def student(tmp_path: Path, tiny_llama):
    folder = tiny_llama(tmp_path / "student", seed=0)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def prompts(tokenizer, texts: list[str]) -> list[TokenizedAnswer]:
    examples = []
    for text in texts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        examples.append(TokenizedAnswer(text, list(ids), [1, 2, 3], "teacher text", None))
    return examples


@torch.no_grad()
def greedy(model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """The most likely continuation, one full forward pass a token (no cache, no padding, no stopping)."""
    ids = list(prompt_ids)
    for _ in range(new_tokens):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


def test_greedy_generations_are_the_students_own_continuations(student):
    model, tokenizer = student
    examples = prompts(tokenizer, ["hi", "tell me about the sea and the rain", "why bread"])
    settings = OnPolicySpec.model_validate({"maxNewTokens": 6, "temperature": 0.0})
    generated = generate_responses(
        model, examples, settings, stop_token_ids=[-1], pad_token_id=0, max_seq_len=512, seed=[0, 0, 0]
    )
    assert [answer.prompt_ids for answer in generated] == [example.prompt_ids for example in examples]
    for answer, example in zip(generated, examples, strict=True):
        assert answer.response_ids == greedy(model, example.prompt_ids, 6)
        assert answer.teacher is None


def test_generation_stops_at_a_stop_token_and_within_the_sequence_length(student):
    model, tokenizer = student
    examples = prompts(tokenizer, ["tell me about cats", "write a poem about trains"])
    settings = OnPolicySpec.model_validate({"maxNewTokens": 8, "temperature": 0.0})
    unconstrained = [greedy(model, example.prompt_ids, 8) for example in examples]
    stop = unconstrained[0][2]
    generated = generate_responses(
        model, examples, settings, stop_token_ids=[stop], pad_token_id=0, max_seq_len=512, seed=[0, 0, 0]
    )
    for answer, tokens in zip(generated, unconstrained, strict=True):
        assert answer.response_ids == tokens[: tokens.index(stop) + 1 if stop in tokens else 8]
    assert generated[0].response_ids[-1] == stop  # the stop token is the last one

    room = len(examples[1].prompt_ids) + 2
    generated = generate_responses(
        model, examples[1:], settings, stop_token_ids=[-1], pad_token_id=0, max_seq_len=room, seed=[0, 0, 0]
    )
    assert generated[0].response_ids == unconstrained[1][:2]
    assert generated[0].positions <= room


def test_sampled_generations_repeat_with_the_seed(student):
    model, tokenizer = student
    examples = prompts(tokenizer, ["tell me about cats", "why do people like rain"])
    settings = OnPolicySpec.model_validate({"maxNewTokens": 8, "temperature": 1.0})

    def sample(seed: list[int]) -> list[list[int]]:
        generated = generate_responses(
            model, examples, settings, stop_token_ids=[-1], pad_token_id=0, max_seq_len=512, seed=seed
        )
        return [answer.response_ids for answer in generated]

    assert sample([0, 5, 0]) == sample([0, 5, 0])
    assert sample([0, 5, 0]) != sample([0, 6, 0])


class _WeightCasts(TorchDispatchMode):
    """Counts the casts of `weights` (tensors, by storage) to another dtype."""

    CASTS = (torch.ops.aten._to_copy, torch.ops.aten.to)

    def __init__(self, weights) -> None:
        super().__init__()
        self.storages = {weight.untyped_storage().data_ptr() for weight in weights}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        source = args[0] if args else None
        if func.overloadpacket in self.CASTS and isinstance(source, torch.Tensor):
            self.count += source.untyped_storage().data_ptr() in self.storages
        return func(*args, **(kwargs or {}))


def test_generating_under_bf16_autocast_casts_each_weight_once_not_at_every_token(student):
    """The trainer generates on-policy answers under bf16 autocast: its cast of each weight must be reused
    across the decoding steps (re-casting the weights at every token made decoding twice as slow)."""
    model, tokenizer = student
    model.requires_grad_(True)  # as in training: autocast caches casts of weights that require grad
    weights = [p for name, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in name]
    settings = OnPolicySpec.model_validate({"maxNewTokens": 8, "temperature": 0.0})
    casts = _WeightCasts(weights)
    with torch.autocast("cpu", dtype=torch.bfloat16), casts:
        generated = generate_responses(
            model,
            prompts(tokenizer, ["tell me about cats"]),
            settings,
            stop_token_ids=[-1],
            pad_token_id=0,
            max_seq_len=512,
            seed=[0, 0, 0],
        )
    assert len(generated[0].response_ids) == 8
    assert 0 < casts.count <= len(weights)
