"""Calibration text for pruning the teacher into a student: the first answers of the training data,
tokenized once and run through a model to measure what its layers and channels do. Each training worker
runs its share of the answers, and the workers sum what they measured (`Total`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from stillhouse.trainer.data import tokenize_answers

# Sums figures over the training workers, so that every worker ranks on the whole calibration text.
Total = Callable[[list[float]], list[float]]

# Capped so that ranking the layers and channels of a large teacher on the CPU, where pruning happens,
# stays a small share of the run.
CALIBRATION_ANSWERS = 32
CALIBRATION_TOKENS = 8192


@dataclass
class CalibrationText:
    """At most `max_answers` of `rows` (answer rows), `max_tokens` positions in all, each answer cut to
    `max_seq_len`; read from `rows` once, however many rankings use them. Worker `worker` of `workers`
    runs every `workers`-th answer from its own."""

    rows: Iterable[dict[str, Any]]
    max_seq_len: int
    max_answers: int = CALIBRATION_ANSWERS
    max_tokens: int = CALIBRATION_TOKENS
    worker: int = 0
    workers: int = 1
    _sequences: list[list[int]] | None = field(default=None, init=False, repr=False)

    def sequences(self, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
        if self._sequences is None:
            self._sequences = self._tokenize(tokenizer)
        return self._sequences

    def runner(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, option: str
    ) -> Callable[[], None]:
        """A function that feeds this worker's calibration sequences through `model`; ValueError naming
        `option` (what needs the text) when the training data has no answer."""
        sequences = self.sequences(tokenizer)
        if not sequences:
            raise ValueError(f"{option} found no training answer to calibrate on")

        def run_model() -> None:
            for ids in sequences[self.worker :: self.workers]:
                model(input_ids=torch.tensor([ids], device=model.device), use_cache=False)

        return run_model

    def _tokenize(self, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
        answers = tokenize_answers(
            itertools.islice(self.rows, self.max_answers),
            tokenizer,
            use_teacher_tokens=True,
            max_seq_len=self.max_seq_len,
        )
        sequences, tokens = [], 0
        for answer in answers:
            ids = (answer.prompt_ids + answer.response_ids)[: self.max_tokens - tokens]
            sequences.append(ids)
            tokens += len(ids)
            if tokens >= self.max_tokens:
                break
        return sequences


def summed(total: Total, *parts: torch.Tensor) -> list[torch.Tensor]:
    """Each of `parts` (float64 figures of this worker) summed over the workers by `total`, in one call,
    each back in its own shape."""
    flat = torch.tensor(total(torch.cat([part.reshape(-1) for part in parts]).tolist()), dtype=torch.float64)
    pieces = flat.split([part.numel() for part in parts])
    return [piece.reshape(part.shape) for piece, part in zip(pieces, parts, strict=True)]


def run_recording(run_model: Callable[[], None], hooks: list[RemovableHandle]) -> None:
    """`run_model` without gradients while the recording `hooks` are on; they are removed after."""
    try:
        with torch.inference_mode():
            run_model()
    finally:
        for hook in hooks:
            hook.remove()
