"""On-policy distillation (GKD, Agarwal et al. 2024): which optimizer steps train on the student's own
generations, and those generations as training examples.

Which steps: a share λ (`training.onPolicy.fraction`) of the steps, spread evenly. Step s is on-policy
when ⌊(s + 1)·λ + u⌋ > ⌊s·λ + u⌋, with the offset u ∈ [0, 1) drawn from the training seed: any run of n
steps holds ⌊n·λ⌋ or ⌈n·λ⌉ on-policy steps, and the choice depends on nothing but the seed and the step,
so a resumed run makes the same one.

What they train on: the prompts of the step's examples, continued by the student (in eval mode, without
gradients, batched, `generate_batch` of the local teacher backend) for at most `maxNewTokens` tokens and
never past `maxSeqLen`, stopping at the student's end-of-sequence tokens (the stop token is the last
trained position: nothing after it is). Sampling at `onPolicy.temperature` (0: greedy) draws from a seed
of the training seed, the step and the worker, so a resumed run generates the same tokens.

How: the teacher's full logits score every generated position with the configured divergence
(forward KL, reverse KL or JSD at the loss temperature). `ceWeight` does not apply: its cross-entropy is
on the teacher's text, and the generated tokens are the student's. `unlikelihoodWeight` does: its earlier
tokens are then the student's own, and so is its loop: a generated token that completes a 4-gram already
said in its response is penalised too (sequence-level unlikelihood, `losses`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from transformers import PreTrainedModel

from stillhouse.common.jobspec import LossSpec, OnPolicySpec
from stillhouse.common.models.generation import DecodeRequest, generate_batch
from stillhouse.trainer.data import TokenizedAnswer

# Prompts decoded together: enough to keep matrix kernels busy, few enough to bound the KV cache.
GENERATION_BATCH_ROWS = 64


def _offset(seed: int) -> float:
    return float(np.random.default_rng([seed, 0x6B64]).random())


def is_on_policy_step(seed: int, step: int, fraction: float) -> bool:
    """Whether optimizer step `step` (0-based) trains on the student's own generations."""
    offset = _offset(seed)
    return math.floor((step + 1) * fraction + offset) > math.floor(step * fraction + offset)


def on_policy_steps(seed: int, steps: int, fraction: float) -> int:
    """How many of the first `steps` steps are on-policy."""
    offset = _offset(seed)
    return math.floor(steps * fraction + offset) - math.floor(offset)


def on_policy_loss(loss: LossSpec) -> LossSpec:
    """The loss of an on-policy step: the configured divergence on the teacher's full logits, no
    cross-entropy (there is no teacher text to take it on)."""
    return loss.model_copy(update={"ce_weight": 0.0, "teacher_logits": "full"})


def generate_responses(
    model: PreTrainedModel,
    examples: Sequence[TokenizedAnswer],
    settings: OnPolicySpec,
    *,
    stop_token_ids: Iterable[int],
    pad_token_id: int,
    max_seq_len: int,
    seed: Sequence[int],
) -> list[TokenizedAnswer]:
    """`examples` with their responses replaced by `model`'s continuations of their prompts (see the
    module docstring), in the same order. `seed` (e.g. [training seed, step, rank]) fixes the sampling."""
    stops = sorted(set(stop_token_ids))
    row_seeds = np.random.default_rng(list(seed)).integers(0, 2**62, size=len(examples)).tolist()
    requests = [
        DecodeRequest(
            prompt_ids=example.prompt_ids,
            max_new_tokens=min(settings.max_new_tokens, max_seq_len - len(example.prompt_ids)),
            temperature=settings.temperature,
            seed=row_seed,
        )
        for example, row_seed in zip(examples, row_seeds, strict=True)
    ]
    # Prompts of like length share a batch, so that left padding stays small.
    order = sorted(range(len(requests)), key=lambda index: len(requests[index].prompt_ids))
    responses: list[list[int]] = [[] for _ in requests]
    for start in range(0, len(order), GENERATION_BATCH_ROWS):
        chunk = order[start : start + GENERATION_BATCH_ROWS]
        decoded = generate_batch(model, [requests[index] for index in chunk], stops, pad_token_id)
        for index, answer in zip(chunk, decoded, strict=True):
            responses[index] = answer.token_ids.tolist()
    return [
        TokenizedAnswer(example.prompt_id, example.prompt_ids, response, "", None)
        for example, response in zip(examples, responses, strict=True)
    ]
