"""Tokens and dollars a teacher stage will spend, worked out before it calls the teacher.

Pure: the caller passes the prompts, a token counter and the price. With the teacher's tokenizer the
prompt side is close to exact; without one, `approximate_token_count` (about 4 characters per token,
right for English with GPT-style tokenizers, low for code and most other languages) is the default.
The completion side is a guess by nature: by default every answer is taken to run to `max_tokens`,
so the estimate is an upper bound, the same one the budget uses per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from stillhouse.teacher.calls import ChatMessage
from stillhouse.teacher.ledger import Price
from stillhouse.teacher.v1 import teacher_pb2

# Characters per token when the teacher's tokenizer is unknown.
CHARS_PER_TOKEN = 4
# Chat templates wrap every message in a role and separators (OpenAI counts 3-4 tokens, Llama 3 and
# Qwen 4-5): what a message costs beyond its content.
TOKENS_PER_MESSAGE = 4
# The assistant header a chat template appends so that the model answers.
TOKENS_PER_REPLY = 3

TokenCounter = Callable[[str], int]


def approximate_token_count(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def prompt_tokens(
    messages: Sequence[ChatMessage], count_tokens: TokenCounter = approximate_token_count
) -> int:
    """Prompt tokens of one chat: each message's content and template overhead, and the reply header."""
    return sum(TOKENS_PER_MESSAGE + count_tokens(message.content) for message in messages) + TOKENS_PER_REPLY


def call_estimate_usd(
    messages: Sequence[ChatMessage],
    max_tokens: int,
    price: Price,
    count_tokens: TokenCounter = approximate_token_count,
) -> float:
    """The most one call can cost, answer at `max_tokens`: what `Budget.would_exceed` is given."""
    return price.cost_usd(prompt_tokens(messages, count_tokens), max_tokens)


@dataclass(frozen=True)
class CostEstimate:
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float

    def to_proto(self) -> teacher_pb2.CostEstimate:
        return teacher_pb2.CostEstimate(
            requests=self.requests,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cost_usd=self.cost_usd,
        )


def estimate_cost(
    prompts: Iterable[Sequence[ChatMessage]],
    *,
    max_tokens: int,
    price: Price,
    count_tokens: TokenCounter = approximate_token_count,
    expected_completion_fraction: float = 1.0,
) -> CostEstimate:
    """One request per prompt (a list of chat messages); each answer taken to be
    `expected_completion_fraction` of `max_tokens` long (1.0: an upper bound). Answers the cache
    already holds are counted too: the estimate is of the work, not of what is left of it."""
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be 0 or more, not {max_tokens}")
    if not 0.0 <= expected_completion_fraction <= 1.0:
        raise ValueError(
            f"expected_completion_fraction must be between 0 and 1, not {expected_completion_fraction}"
        )
    requests = 0
    prompt_total = 0
    for messages in prompts:
        requests += 1
        prompt_total += prompt_tokens(messages, count_tokens)
    completion_total = round(requests * max_tokens * expected_completion_fraction)
    return CostEstimate(
        requests=requests,
        prompt_tokens=prompt_total,
        completion_tokens=completion_total,
        cost_usd=price.cost_usd(prompt_total, completion_total),
    )
