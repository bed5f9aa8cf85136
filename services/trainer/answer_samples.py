"""Held-out answers side by side: for the first held-out prompts, the prompt, the teacher's answer and each
trained model's greedy answer, every text cut to a bound, for the report and the job's summary.

Pure: built from the held-out rows and the answers the evaluation already generated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

SAMPLE_PROMPTS = 8  # the first held-out prompts, in the held-out dataset's order
SAMPLE_CHARACTERS = 1000  # the longest text a sample keeps, ellipsis included
ELLIPSIS = "…"


def bounded(text: str, limit: int = SAMPLE_CHARACTERS) -> str:
    """`text` when it has at most `limit` characters; else its start, ending in an ellipsis, `limit`
    characters in all."""
    if limit < 1:
        raise ValueError(f"the limit must be at least 1 character, got {limit}")
    if len(text) <= limit:
        return text
    return text[: limit - len(ELLIPSIS)] + ELLIPSIS


def prompt_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The user's prompt as the models saw it before the chat template: the content of the conversation's
    last user message ("" when it has none)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return str(message.get("content") or "")
    return ""


def sample_key(model: str) -> str:
    """A trained model's name (`control-sft`) as a sample's key (`control_sft`)."""
    return model.replace("-", "_")


def answer_samples(
    rows: Sequence[Mapping[str, Any]],
    teacher: Sequence[str],
    answers: Mapping[str, Sequence[str]],
    count: int = SAMPLE_PROMPTS,
) -> list[dict[str, str]]:
    """The first `count` held-out answers side by side. `rows`: the held-out rows (`prompt_id`, `messages`),
    `teacher`: the teacher's answer to each, `answers`: each trained model's greedy answer to each, by
    model name (baseline, control-sft, student), all in the same order. Keys: prompt_id, prompt, teacher,
    then one per model (`sample_key`)."""
    lengths = {len(teacher), *(len(texts) for texts in answers.values())}
    if lengths != {len(rows)}:
        raise ValueError(
            f"every model needs one answer per held-out row: {len(rows)} rows, {len(teacher)} teacher "
            f"answers, {', '.join(f'{len(texts)} of the {name}' for name, texts in answers.items())}"
        )
    samples = []
    for index, row in enumerate(rows[:count]):
        sample = {
            "prompt_id": row["prompt_id"],
            "prompt": bounded(prompt_text(row["messages"])),
            "teacher": bounded(teacher[index]),
        }
        sample |= {sample_key(name): bounded(texts[index]) for name, texts in answers.items()}
        samples.append(sample)
    return samples
