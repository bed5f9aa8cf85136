"""Reference rows of the evaluation: next-token distributions that ignore the context.

A trained student's figures mean little alone; beside these they say what training bought:

- `uniform`: every token of the vocabulary equally likely. Its perplexity is the vocabulary size; it
  has no most likely token, so neither top-1 agreement nor a greedy answer is defined for it.
- `unigram`: how often each token appears in the training answers' responses (the labels the student is
  trained on, end-of-sequence included), smoothed with add-a (a = `UNIGRAM_SMOOTHING` = 0.5, the
  Krichevsky-Trofimov estimator): q(v) = (count(v) + a) / (N + a·V). Every token keeps a probability
  above 0, so KL(teacher ‖ unigram) is finite even where the teacher favours a token never seen in
  training. Its greedy answer is its most frequent token, repeated (empty when that token ends a turn).

Both are `ContextFreeModel`s: called like a causal LM, they return the same logits at every position,
so the evaluation scores them exactly as it scores the student (teacher forcing, the same KL buckets).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from stillhouse.trainer.data import TokenizedAnswer

UNIGRAM_SMOOTHING = 0.5


@dataclass(frozen=True)
class ContextFreeOutput:
    logits: torch.Tensor  # [B, T, V]


class ContextFreeModel:
    """A next-token distribution that does not depend on the context: `log_probs` [V]."""

    def __init__(self, log_probs: torch.Tensor) -> None:
        if log_probs.dim() != 1:
            raise ValueError(
                f"log_probs must be one vector over the vocabulary, got {tuple(log_probs.shape)}"
            )
        self.log_probs = log_probs
        self.device = log_probs.device

    @property
    def vocab_size(self) -> int:
        return self.log_probs.shape[0]

    def __call__(self, *, input_ids: torch.Tensor, **_: object) -> ContextFreeOutput:
        """The same logits at every position of `input_ids` [B, T] (the other arguments of a causal LM's
        forward, position ids and caching, change nothing here)."""
        return ContextFreeOutput(self.log_probs.expand(*input_ids.shape, self.vocab_size))

    def to(self, device: torch.device) -> ContextFreeModel:
        return ContextFreeModel(self.log_probs.to(device))

    def most_likely_token(self) -> int:
        return int(self.log_probs.argmax())


def uniform_model(vocab_size: int, device: torch.device | None = None) -> ContextFreeModel:
    return ContextFreeModel(torch.full((vocab_size,), -np.log(vocab_size), device=device))


def unigram_counts(answers: Iterable[TokenizedAnswer], vocab_size: int) -> np.ndarray:
    """How many times each token id is a response token of `answers`."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for answer in answers:
        ids = np.asarray(answer.response_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(
                f"answer {answer.prompt_id} has token ids outside the vocabulary of {vocab_size} tokens"
            )
        counts += np.bincount(ids, minlength=vocab_size)
    return counts


def unigram_model(
    counts: np.ndarray, smoothing: float = UNIGRAM_SMOOTHING, device: torch.device | None = None
) -> ContextFreeModel:
    """The add-`smoothing` estimate from token `counts` [V] (see the module docstring)."""
    if smoothing <= 0:
        raise ValueError(f"smoothing must be > 0 so that every token keeps some probability, got {smoothing}")
    smoothed = counts.astype(np.float64) + smoothing
    log_probs = np.log(smoothed) - np.log(smoothed.sum())
    return ContextFreeModel(torch.tensor(log_probs, dtype=torch.float32, device=device))
