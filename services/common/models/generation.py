"""Batched decoding of a Hugging Face causal LM over a KV cache, recording the top-k logprobs of each
generated token as it goes: the local teacher answers with it, and the trainer generates with it
(greedy answers for evaluation, the student's own answers for on-policy batches).

`generate_batch` is a plain decoding loop. Finished rows stay in the batch, their tokens ignored, until
at most half of it is still generating; then the batch shrinks, so that one long answer does not keep a
large batch running. A greedy row takes the most likely token; a sampled row draws from its own
`torch.Generator`, seeded with the request's seed, so its tokens do not depend on the rows beside it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from stillhouse.common.datasets.sparse_logprobs import LOGPROB_FLOOR, SparseLogprobs


@dataclass(frozen=True)
class DecodeRequest:
    """One row of a batch: a tokenized prompt and how to continue it."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    top_logprobs: int = 0  # k of the logprobs to record per generated token; 0: none


@dataclass
class Decoded:
    token_ids: np.ndarray  # int32 [T], the end-of-sequence token included when there was one
    finish_reason: str  # "stop" (end-of-sequence token) or "length" (max_new_tokens)
    logprobs: SparseLogprobs | None  # None when the request asked for none


@dataclass
class _RowOutput:
    tokens: list[int] = field(default_factory=list)
    topk_ids: list[torch.Tensor] = field(default_factory=list)
    topk_logprobs: list[torch.Tensor] = field(default_factory=list)
    tail_logprobs: list[torch.Tensor] = field(default_factory=list)
    finish_reason: str = "length"


# no_grad, not inference_mode: under bf16 autocast (the trainer's on-policy generations), autocast keeps
# its bf16 copies of the weights for the whole decode only outside inference mode; inside it, every step
# casts every weight again, which made the demo student's decoding twice as slow on a CPU.
@torch.no_grad()
def generate_batch(
    model: PreTrainedModel,
    requests: Sequence[DecodeRequest],
    stop_token_ids: Iterable[int],
    pad_token_id: int = 0,
) -> list[Decoded]:
    """Continue every request's prompt in one batch until it ends with a stop token or reaches its
    max_new_tokens; the top-k logprobs of each generated token are recorded as it is generated."""
    device = model.device
    stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
    samplers = [_RowSampler.for_request(request, device) for request in requests]
    top_k = max(request.top_logprobs for request in requests)
    outputs = [_RowOutput() for _ in requests]
    done = [False] * len(requests)

    input_ids, attention_mask = _left_padded(
        [request.prompt_ids for request in requests], pad_token_id, device
    )
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    logits = _next_token_logits(model, input_ids, attention_mask, position_ids, cache)
    rows = list(range(len(requests)))  # the request of each row of the batch
    for step in range(max(request.max_new_tokens for request in requests)):
        if top_k:
            recorded = _top_logprobs(logits, top_k)
            topk_ids, topk_logprobs, tail = (part.cpu() for part in recorded)
        # A greedy row takes the first token it records, so that a tie (bf16 logits come in steps of 1/16
        # to 1/8 at a language model's sizes) is broken the same way in the answer and in its logprobs.
        greedy = recorded[0][:, 0] if top_k else logits.argmax(dim=-1)
        next_tokens = _choose_tokens(
            logits, greedy, [None if done[index] else samplers[index] for index in rows]
        )
        stopped = torch.isin(next_tokens, stops).tolist()
        for row, (index, token) in enumerate(zip(rows, next_tokens.tolist(), strict=True)):
            if done[index]:  # a finished row kept in the batch: its tokens are not part of any answer
                continue
            output = outputs[index]
            output.tokens.append(token)
            if top_k:
                output.topk_ids.append(topk_ids[row])
                output.topk_logprobs.append(topk_logprobs[row])
                output.tail_logprobs.append(tail[row])
            if stopped[row]:
                output.finish_reason = "stop"
            done[index] = stopped[row] or step + 1 >= requests[index].max_new_tokens
        if all(done):
            break
        keep = _rows_to_keep([done[index] for index in rows])
        if keep is not None:
            rows = [rows[row] for row in keep]
            keep_index = torch.tensor(keep, device=device)
            next_tokens, attention_mask = next_tokens[keep_index], attention_mask[keep_index]
            position_ids = position_ids[keep_index]
            cache.batch_select_indices(keep_index)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1)
        position_ids = position_ids[:, -1:] + 1
        logits = _next_token_logits(model, next_tokens[:, None], attention_mask, position_ids, cache)
    return [_decoded(output, request.top_logprobs) for output, request in zip(outputs, requests, strict=True)]


# Row counts the batch shrinks to are multiples of this: matrix kernels are fastest on them (on the CPU,
# an output layer over 7 rows was measured twice as slow as over 8).
_ROW_MULTIPLE = 8


def _rows_to_keep(finished: Sequence[bool]) -> list[int] | None:
    """Rows to carry on with, once finished rows make up at least half of the batch: every unfinished
    row, plus finished ones to round the count up to a multiple of `_ROW_MULTIPLE`. None (keep all)
    while shrinking would save less than half of each step."""
    unfinished = [row for row, done in enumerate(finished) if not done]
    size = -(-len(unfinished) // _ROW_MULTIPLE) * _ROW_MULTIPLE
    if size > len(finished) // 2:
        return None
    filler = [row for row, done in enumerate(finished) if done][: size - len(unfinished)]
    return sorted(unfinished + filler)


def _left_padded(
    prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts right-aligned in one [B, L] tensor, so every row's next token is in the last column."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _next_token_logits(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: DynamicCache,
) -> torch.Tensor:
    """[B, V] float32 logits of the token after each row; the output layer runs on the last position only."""
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return output.logits[:, -1, :].float()


def _top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k most likely tokens of each row, their logprobs, and the log of the mass outside them, summed
    over the other tokens (not 1 minus the top k, which loses every digit when the top k hold ~all of it)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    topk_logprobs, topk_ids = logprobs.topk(k, dim=-1)
    tail = torch.logsumexp(logprobs.scatter(-1, topk_ids, float("-inf")), dim=-1)
    return topk_ids, topk_logprobs, tail


@dataclass
class _RowSampler:
    temperature: float
    top_p: float
    generator: torch.Generator

    @classmethod
    def for_request(cls, request: DecodeRequest, device: torch.device) -> _RowSampler | None:
        if request.temperature == 0:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(request.seed if request.seed is not None else secrets.randbits(63))
        return cls(request.temperature, request.top_p, generator)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p >= 1:
            return torch.multinomial(probabilities, 1, generator=self.generator)[0]
        # Nucleus: the most likely tokens whose mass reaches top_p; the first always stays.
        sorted_probabilities, order = probabilities.sort(descending=True)
        before = sorted_probabilities.cumsum(-1) - sorted_probabilities
        sorted_probabilities[before >= self.top_p] = 0
        return order[torch.multinomial(sorted_probabilities, 1, generator=self.generator)[0]]


def _choose_tokens(
    logits: torch.Tensor, greedy: torch.Tensor, samplers: Sequence[_RowSampler | None]
) -> torch.Tensor:
    tokens = greedy.clone()
    for row, sampler in enumerate(samplers):
        if sampler is not None:
            tokens[row] = sampler.sample(logits[row])
    return tokens


def _decoded(output: _RowOutput, k: int) -> Decoded:
    token_ids = np.asarray(output.tokens, dtype=np.int32)
    if k == 0:
        return Decoded(token_ids, output.finish_reason, None)
    topk_ids = torch.stack(output.topk_ids).numpy()
    topk_logprobs = torch.stack(output.topk_logprobs).numpy().astype(np.float64)
    tail = torch.stack(output.tail_logprobs).numpy().astype(np.float64)
    # The batch recorded its largest k: tokens k.. of those belong to this request's tail.
    tail = np.logaddexp.reduce(np.concatenate([tail[:, None], topk_logprobs[:, k:]], axis=1), axis=1)
    logprobs = SparseLogprobs(
        token_ids=token_ids,
        topk_ids=np.ascontiguousarray(topk_ids[:, :k], dtype=np.int32),
        topk_logprobs=np.maximum(topk_logprobs[:, :k], LOGPROB_FLOOR).astype(np.float32),
        tail_logprob=np.maximum(tail, LOGPROB_FLOOR).astype(np.float32),
    )
    return Decoded(token_ids, output.finish_reason, logprobs)


def default_stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The model's end-of-sequence tokens: its generation config's, and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    stops = set(configured) if isinstance(configured, list) else {configured}
    stops.add(tokenizer.eos_token_id)
    stops.discard(None)
    if not stops:
        raise ValueError("the model names no end-of-sequence token: give stop_token_ids")
    return stops
