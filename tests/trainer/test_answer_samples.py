"""Held-out answers side by side: texts bounded, the prompt as the user wrote it, the first rows in order."""

from __future__ import annotations

import pytest

from stillhouse.trainer.answer_samples import (
    ELLIPSIS,
    SAMPLE_CHARACTERS,
    SAMPLE_PROMPTS,
    answer_samples,
    bounded,
    prompt_text,
)


def test_a_text_within_the_bound_is_kept_whole():
    assert bounded("short", 5) == "short"
    assert bounded("", 5) == ""
    assert bounded("x" * SAMPLE_CHARACTERS) == "x" * SAMPLE_CHARACTERS


def test_a_longer_text_is_cut_to_the_bound_with_an_ellipsis():
    assert bounded("abcdefgh", 5) == "abcd" + ELLIPSIS
    cut = bounded("y" * (SAMPLE_CHARACTERS + 1))
    assert len(cut) == SAMPLE_CHARACTERS and cut.endswith(ELLIPSIS) and cut.startswith("y" * 999)
    with pytest.raises(ValueError, match="at least 1 character, got 0"):
        bounded("text", 0)


def test_the_prompt_is_the_last_user_message():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": "Second question"},
    ]
    assert prompt_text(messages) == "Second question"
    assert prompt_text([{"role": "system", "content": "Be brief."}]) == ""
    assert prompt_text([]) == ""


def _rows(count: int) -> list[dict]:
    return [
        {"prompt_id": f"p{index}", "messages": [{"role": "user", "content": f"question {index}"}]}
        for index in range(count)
    ]


def test_samples_are_the_first_rows_in_order_with_every_model_answer():
    rows = _rows(SAMPLE_PROMPTS + 2)
    teacher = [f"teacher {index}" for index in range(len(rows))]
    answers = {
        "baseline": [f"baseline {index}" for index in range(len(rows))],
        "control-sft": [f"control {index}" for index in range(len(rows))],
        "student": [f"student {index}" for index in range(len(rows))],
    }
    samples = answer_samples(rows, teacher, answers)
    assert [sample["prompt_id"] for sample in samples] == [f"p{index}" for index in range(SAMPLE_PROMPTS)]
    assert samples[3] == {
        "prompt_id": "p3",
        "prompt": "question 3",
        "teacher": "teacher 3",
        "baseline": "baseline 3",
        "control_sft": "control 3",
        "student": "student 3",
    }
    assert (
        len(answer_samples(rows[:2], teacher[:2], {name: texts[:2] for name, texts in answers.items()})) == 2
    )


def test_every_text_of_a_sample_is_bounded():
    rows = [{"prompt_id": "p", "messages": [{"role": "user", "content": "q" * 5000}]}]
    [sample] = answer_samples(rows, ["t" * 5000], {"baseline": ["b" * 5000], "student": ["s"]})
    assert sample["student"] == "s"
    for key in ("prompt", "teacher", "baseline"):
        assert len(sample[key]) == SAMPLE_CHARACTERS and sample[key].endswith(ELLIPSIS)


def test_a_model_without_an_answer_per_row_is_refused():
    with pytest.raises(ValueError, match="2 rows, 2 teacher answers, 2 of the baseline, 1 of the student"):
        answer_samples(_rows(2), ["a", "b"], {"baseline": ["a", "b"], "student": ["a"]})
