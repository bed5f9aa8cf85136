"""The training data pipeline on real answers datasets written by a tiny random teacher with SmolLM2's
tokenizer: tokenizing, label shifting and masking, teacher alignment, packing (checked against the model
itself), truncation and cutting steps into micro-batches (streaming and each worker's slice of the
dataset: test_worker_data.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stillhouse.common.datasets.sparse_logprobs import SparseLogprobs
from stillhouse.trainer.data import (
    IGNORE_INDEX,
    BatchPlan,
    DataCounts,
    TokenizedAnswer,
    collate,
    pack_rows,
    read_answer_rows,
    tokenize_answers,
)

DATASET = "jobs/test/teacher/train"
PROMPTS = [
    "tell me a story",
    "why is the sky blue",
    "write a short poem about the moon",
    "hello",
    "what is two plus two",
    "name three rivers",
]


@pytest.fixture
def teacher_dir(tmp_path: Path, tiny_llama) -> Path:
    return tiny_llama(tmp_path / "teacher", seed=1)


@pytest.fixture
def answer_rows(object_store, answers_dataset, teacher_dir) -> list[dict]:
    answers_dataset(object_store, DATASET, teacher_dir, PROMPTS, top_k=5, max_new_tokens=12)
    return list(read_answer_rows(object_store, DATASET))


@pytest.fixture
def tokenizer(tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_prompt_is_the_chat_template_and_response_the_teachers_tokens(answer_rows, tokenizer):
    examples = list(tokenize_answers(answer_rows, tokenizer, use_teacher_tokens=True, max_seq_len=512))
    assert len(examples) == len(PROMPTS)
    for row, example in zip(answer_rows, examples, strict=True):
        expected_prompt = tokenizer.apply_chat_template(
            row["messages"], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert example.prompt_ids == list(expected_prompt)
        assert example.response_ids == row["token_ids"]
        assert example.teacher is not None and example.teacher.num_tokens == len(row["token_ids"])


def test_response_from_text_when_the_tokenizers_differ(answer_rows, tokenizer):
    row = dict(answer_rows[0], response="The sky is blue.", finish_reason="stop")
    (example,) = tokenize_answers([row], tokenizer, use_teacher_tokens=False, max_seq_len=512)
    assert example.teacher is None
    assert example.response_ids == [
        *tokenizer.encode("The sky is blue.", add_special_tokens=False),
        tokenizer.eos_token_id,
    ]
    cut_short = dict(row, finish_reason="length")
    (example,) = tokenize_answers([cut_short], tokenizer, use_teacher_tokens=False, max_seq_len=512)
    assert example.response_ids[-1] != tokenizer.eos_token_id


def test_labels_are_shifted_and_prompt_positions_masked():
    example = TokenizedAnswer(
        "p", prompt_ids=[10, 11, 12], response_ids=[20, 21], response_text="", teacher=None
    )
    batch = collate([example], [[0]], pad_token_id=0, teacher_k=None, length=6)
    # Inputs: every token but the last; position t predicts token t + 1, and only response tokens count.
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 0, 0]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 20, 21, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert (batch.tokens, batch.label_tokens) == (4, 2)


def test_teacher_top_k_sits_where_its_token_is_the_label(answer_rows, tokenizer):
    """The teacher answered greedily, so at every labelled position its most likely token is the label:
    an off-by-one alignment would break this."""
    examples = list(tokenize_answers(answer_rows, tokenizer, use_teacher_tokens=True, max_seq_len=512))
    rows = pack_rows(examples, range(len(examples)), max_seq_len=512)
    assert len(rows) < len(examples)  # several examples share a row
    batch = collate(examples, rows, pad_token_id=tokenizer.pad_token_id, teacher_k=5)
    labelled = batch.labels != IGNORE_INDEX
    assert int(labelled.sum()) == sum(len(example.response_ids) for example in examples)
    assert torch.equal(batch.teacher_ids[..., 0][labelled], batch.labels[labelled])
    # The stored logprobs come along at the same positions, most likely first.
    assert (batch.teacher_logprobs[labelled][:, 0] >= batch.teacher_logprobs[labelled][:, 1]).all()


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_examples_do_not_see_each_other(tmp_path, tiny_llama, attention):
    """Logits of a packed row equal those of each example run alone; without restarting positions (one
    long sequence) they do not, so the comparison can tell."""
    folder = tiny_llama(tmp_path / "model", seed=3)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attention).eval()
    generator = np.random.default_rng(0)
    examples = [
        TokenizedAnswer(
            f"p{i}",
            generator.integers(100, 40000, size=prompt).tolist(),
            generator.integers(100, 40000, size=response).tolist(),
            "",
            None,
        )
        for i, (prompt, response) in enumerate([(5, 4), (7, 3), (3, 6)])
    ]
    packed = collate(examples, [[0, 1, 2]], pad_token_id=0, teacher_k=None, length=40)
    with torch.no_grad():
        packed_logits = model(
            input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False
        ).logits[0]
        start = 0
        for index, example in enumerate(examples):
            alone = collate(examples, [[index]], pad_token_id=0, teacher_k=None)
            alone_logits = model(input_ids=alone.input_ids, use_cache=False).logits[0]
            size = example.positions
            torch.testing.assert_close(
                packed_logits[start : start + size], alone_logits, atol=1e-4, rtol=1e-4
            )
            start += size
        leaking = model(input_ids=packed.input_ids, use_cache=False).logits[0]
    second = slice(examples[0].positions, examples[0].positions + examples[1].positions)
    assert not torch.allclose(leaking[second], packed_logits[second], atol=1e-3)


def test_packing_fills_rows_up_to_max_seq_len():
    examples = [
        TokenizedAnswer(str(i), [1] * 3, [2] * size, "", None) for i, size in enumerate([4, 3, 7, 1, 5])
    ]
    rows = pack_rows(examples, range(5), max_seq_len=12)
    assert rows == [[0, 1], [2, 3], [4]]
    assert all(sum(examples[i].positions for i in row) <= 12 for row in rows)


def test_long_examples_are_truncated_or_dropped_and_counted(answer_rows, tokenizer):
    prompt_lengths = [
        len(
            tokenizer.apply_chat_template(
                row["messages"], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        for row in answer_rows
    ]
    # Room for a few response tokens after the shortest prompts, none after the longest.
    max_seq_len = max(prompt_lengths) - 1
    counts = DataCounts()
    examples = list(
        tokenize_answers(
            answer_rows, tokenizer, use_teacher_tokens=True, max_seq_len=max_seq_len, counts=counts
        )
    )
    dropped = sum(length >= max_seq_len for length in prompt_lengths)
    assert dropped >= 1
    assert counts.rows == len(answer_rows)
    assert counts.dropped_too_long == dropped
    assert counts.kept == len(examples) == len(answer_rows) - dropped
    assert counts.truncated == len(examples)  # every answer is 12 tokens: none fits whole
    for example in examples:
        assert len(example.prompt_ids) + len(example.response_ids) == max_seq_len
        assert example.teacher.num_tokens == len(example.response_ids)
        assert example.teacher.token_ids.tolist() == example.response_ids


def test_batch_plan_splits_a_step_into_micro_batches():
    plan = BatchPlan.create(batch_tokens=4096, max_seq_len=256, world=2, micro_batch_tokens=1024)
    assert (plan.rows_per_step, plan.micro_batch_rows, plan.accumulation_steps) == (8, 4, 2)
    assert plan.steps_per_epoch(10) == 2
    examples = [TokenizedAnswer(str(i), [1], [2], "", None) for i in range(9)]
    rows = [[examples[0], examples[1]], *[[example] for example in examples[2:]]]
    step = plan.step_batch(rows)
    assert step.examples == examples
    assert step.micro_batches == [[[0, 1], [2], [3], [4]], [[5], [6], [7], [8]]]


def test_positions_without_a_teacher_have_every_slot_masked():
    # One example, prompt [1, 2], response [3, 5], in a row of 5 positions: position 1 predicts token 3,
    # position 2 token 5; the prompt position 0 and the padding 3-4 have no teacher. Token 5's third
    # alternative was not sent (masked, as stored).
    example = TokenizedAnswer(
        "p",
        [1, 2],
        [3, 5],
        "",
        SparseLogprobs(
            np.array([3, 5], np.int32),
            np.array([[3, 4, 0], [5, 6, -1]], np.int32),
            np.array([[-0.1, -3.0, -4.0], [-0.2, -2.0, -60.0]], np.float32),
            np.array([-2.5, -1.9], np.float32),
        ),
    )
    batch = collate([example], [[0]], pad_token_id=0, teacher_k=3, length=5)
    assert torch.isfinite(batch.teacher_logprobs).all() and torch.isfinite(batch.teacher_tail).all()
    assert batch.teacher_ids[0].tolist() == [[-1, -1, -1], [3, 4, 0], [5, 6, -1], [-1, -1, -1], [-1, -1, -1]]
    assert batch.teacher_logprobs[0, [0, 3, 4]].eq(-60.0).all()
    assert batch.teacher_tail[0].tolist() == pytest.approx([0.0, -2.5, -1.9, 0.0, 0.0])
