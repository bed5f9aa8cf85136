"""A local server that speaks OpenAI's chat-completions wire format, for tests and benchmarks.

    python tests/teacher/fake_openai.py PORT [--api-key KEY] [--model NAME ...] [--flavor vllm|openai]

`POST /v1/chat/completions` answers as the documented API does: `choices[0].message.content`,
`finish_reason`, `usage`, and when asked (`logprobs: true, top_logprobs: k`) `choices[0].logprobs.content`
with `{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}, ...]}` per generated token. The
"model": each generated token is sampled from one of a fixed bank of softmax distributions over
pseudo-random logits on a small vocabulary, picked by a generator seeded with a hash of the request
(model, messages, sampling). So the same request always gets the same answer, a longer `max_tokens`
extends a shorter one, and the logprobs are real log-probabilities (each position's sum to 1).
Temperature 0 takes the most likely token; any other temperature samples the distribution as it is.
With vLLM's `return_tokens_as_token_ids: true`, tokens come as "token_id:N". Answers are
`answer_tokens` long (64 unless set), or `max_tokens` when that is less (finish_reason "length").

The flavor picks how errors look: "vllm" (default; accepts vLLM's extensions) or "openai" (OpenAI's
error codes, such as `context_length_exceeded`, and refuses vLLM's extensions as OpenAI does).
Requests are refused as the real servers refuse them: 401 without `Authorization: Bearer <--api-key>`
(the message echoes the key it was given, so that a client can be shown never to repeat it), 404 for a
model it does not serve, 400 when `top_logprobs` > 20 or the prompt is longer than `max_prompt_chars`.

Control, for tests (JSON bodies):
- `POST /_control` queues a behaviour for the next completion calls:
  `{"mode": M, "times": N, "model": NAME, "retry_after": S, "delay": S, "status": CODE}` where M is
  `ok`, `429` (with a Retry-After header of `retry_after` seconds when given), `500` (or `status`),
  `slow` (answers after `delay` seconds), `garbage` (200 with a body that is not JSON),
  `missing_fields` (200, JSON without choices), `no_logprobs` (200, logprobs null even when asked) or
  `padded` (the answer followed by spaces up to `size` bytes, with a Content-Length; without `size`,
  spaces that never end).
  `times` limits it to that many calls (default: until reset); `model` to calls for that model;
  `echo_key: true` makes a 429 or 500 message quote the caller's bearer token, as a careless gateway
  might. The first queued behaviour that matches a call applies. The same body may also change
  settings: `api_key`, `models`, `flavor`, `max_prompt_chars`, `answer_tokens`, `latency_ms` (added to
  every completion). `{"clear": true}` drops the queued behaviours (calls already waiting keep theirs)
  and keeps the counts.
- The gate, to stop a run at an exact point: `{"hold_after": N}` lets the next N completion calls through
  and holds every later one until `{"open_gate": true}` (or a reset); a held call whose caller has gone by
  then is not answered (status 499 in `by_status`).
- `GET /_calls`: `{"completions": N, "by_prompt": {last message content: N}, "answered_by_prompt":
  {last message content: N}, "by_status": {code: N}, "in_flight": N, "max_in_flight": N}`:
  `by_prompt` counts calls as they arrive, `answered_by_prompt` the 200 answers sent.
- `POST /_reset`: forget calls and behaviours, restore the start-up settings.
- `GET /_vocab`: the vocabulary, a list of token texts indexed by token id.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

VOCAB_SIZE = 512
MAX_TOP_LOGPROBS = 20
_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]
# Distinct texts: one syllable for the first ids, two for the rest, each after a space.
VOCAB = [
    " " + _SYLLABLES[i % len(_SYLLABLES)] + (_SYLLABLES[i // len(_SYLLABLES)] if i >= len(_SYLLABLES) else "")
    for i in range(VOCAB_SIZE)
]
_VOCAB_BYTES = [list(token.encode()) for token in VOCAB]
_TOKEN_ID_TEXT = [f"token_id:{i}" for i in range(VOCAB_SIZE)]
# Logit scale: a peaked but not degenerate distribution, so top-k and the tail both carry mass.
_LOGIT_SCALE = 3.0

_encode = msgspec.json.encode


@dataclass
class Settings:
    api_key: str | None = None
    models: tuple[str, ...] = ("fake-teacher",)
    flavor: str = "vllm"
    max_prompt_chars: int = 32_000
    answer_tokens: int = 64
    # Added to every completion: a teacher's time to answer.
    latency_ms: float = 0.0


@dataclass
class Rule:
    mode: str
    times: int | None = None
    model: str | None = None
    retry_after: float | None = None
    delay: float = 0.0
    status: int = 500
    echo_key: bool = False
    size: int | None = None


@dataclass
class State:
    startup: Settings
    settings: Settings
    rules: list[Rule] = field(default_factory=list)
    completions: int = 0
    by_prompt: Counter = field(default_factory=Counter)
    answered_by_prompt: Counter = field(default_factory=Counter)
    by_status: Counter = field(default_factory=Counter)
    in_flight: int = 0
    max_in_flight: int = 0
    # Bumped by each reset, so that a call still running across a reset is not counted after it.
    generation: int = 0
    # The gate: once `hold_after` completion calls were let through, later ones wait until it opens.
    hold_after: int | None = None
    let_through: int = 0
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    def reset(self) -> None:
        self.generation += 1
        self.settings = replace(self.startup)
        self.rules.clear()
        self.completions = self.in_flight = self.max_in_flight = 0
        self.hold_after, self.let_through = None, 0
        self.gate.set()
        self.by_prompt.clear()
        self.answered_by_prompt.clear()
        self.by_status.clear()

    def take_rule(self, model: str) -> Rule | None:
        for rule in self.rules:
            if rule.model is None or rule.model == model:
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times <= 0:
                        self.rules.remove(rule)
                return rule
        return None


def _json(document: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encode(document), status_code=status, headers=headers, media_type="application/json")


def _error(
    state: State, status: int, message: str, *, kind: str, code: str | None = None, param: str | None = None
) -> Response:
    if state.settings.flavor == "openai":
        return _json({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)
    vllm_type = {400: "BadRequestError", 401: "Unauthorized", 404: "NotFoundError", 429: "RateLimitError"}
    return _json(
        {
            "error": {
                "message": message,
                "type": vllm_type.get(status, "InternalServerError"),
                "param": param,
                "code": status,
            }
        },
        status,
    )


def _prompt_tokens(messages: list[dict[str, Any]]) -> int:
    # About four characters a token, plus the chat template's few tokens per message.
    return 3 + sum(4 + len(str(message.get("content", ""))) // 4 for message in messages)


class _Distributions:
    """A bank of next-token distributions, made once: each generated token draws one of them, so a
    request costs a few lookups instead of a softmax over fresh logits."""

    rows = 4096

    def __init__(self) -> None:
        logits = np.random.default_rng(0).standard_normal((self.rows, VOCAB_SIZE)) * _LOGIT_SCALE
        peak = logits.max(axis=1, keepdims=True)
        self.logprobs = logits - peak - np.log(np.exp(logits - peak).sum(axis=1, keepdims=True))
        self.cumulative = np.cumsum(np.exp(self.logprobs), axis=1)
        order = np.argsort(-self.logprobs, axis=1, kind="stable")[:, :MAX_TOP_LOGPROBS]
        self.top_ids = order
        self.top_logprobs = np.take_along_axis(self.logprobs, order, axis=1)

    @functools.cache  # noqa: B019 - one bank for the life of the process
    def top_logprobs_json(self, row: int, k: int, token_ids: bool) -> msgspec.Raw:
        """The encoded `top_logprobs` list of one distribution, made on first use."""
        names = _TOKEN_ID_TEXT if token_ids else VOCAB
        return msgspec.Raw(
            _encode(
                [
                    {"token": names[i], "logprob": value, "bytes": _VOCAB_BYTES[i]}
                    for i, value in zip(
                        self.top_ids[row, :k].tolist(), self.top_logprobs[row, :k].tolist(), strict=True
                    )
                ]
            )
        )


_DISTRIBUTIONS = _Distributions()


def _answer(payload: dict[str, Any], settings: Settings, *, with_logprobs: bool) -> dict[str, Any]:
    """The completion for a valid request: deterministic in the request's model, messages and sampling."""
    model, messages = payload["model"], payload["messages"]
    max_tokens = int(payload.get("max_completion_tokens") or payload.get("max_tokens") or 16)
    temperature = float(payload.get("temperature", 1.0))
    identity = _encode([model, messages, payload.get("seed"), temperature, payload.get("top_p", 1.0)])
    seed = int.from_bytes(hashlib.sha256(identity).digest()[:8], "little")
    steps = min(max_tokens, settings.answer_tokens)
    bank = _DISTRIBUTIONS
    # Draws come in order, so a longer answer starts with the shorter one's tokens.
    random = np.random.default_rng(seed)
    rows = random.integers(bank.rows, size=steps)
    if temperature <= 0:
        tokens = bank.logprobs[rows].argmax(axis=1)
    else:
        uniform = random.random(steps)
        tokens = np.minimum((bank.cumulative[rows] < uniform[:, None]).sum(axis=1), VOCAB_SIZE - 1)
    token_list = tokens.tolist()
    text = "".join(VOCAB[token] for token in token_list)
    logprobs_field = None
    if with_logprobs and payload.get("logprobs"):
        k = int(payload.get("top_logprobs") or 0)
        token_ids = bool(payload.get("return_tokens_as_token_ids"))
        names = _TOKEN_ID_TEXT if token_ids else VOCAB
        chosen = bank.logprobs[rows, tokens].tolist()
        logprobs_field = {
            "content": [
                {
                    "token": names[token],
                    "logprob": chosen[step],
                    "bytes": _VOCAB_BYTES[token],
                    "top_logprobs": bank.top_logprobs_json(row, k, token_ids),
                }
                for step, (row, token) in enumerate(zip(rows.tolist(), token_list, strict=True))
            ],
            "refusal": None,
        }
    prompt_tokens = _prompt_tokens(messages)
    return {
        "id": f"chatcmpl-{seed:016x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": logprobs_field,
                "finish_reason": "length" if max_tokens < settings.answer_tokens else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": steps,
            "total_tokens": prompt_tokens + steps,
        },
    }


async def _complete(state: State, request: Request, payload: Any) -> Response:
    settings = state.settings
    openai = settings.flavor == "openai"
    if settings.api_key is not None:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if given != settings.api_key:
            if not openai:
                return _json({"error": "Unauthorized"}, 401)
            return _error(
                state,
                401,
                f"Incorrect API key provided: {given}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                kind="invalid_request_error",
                code="invalid_api_key",
            )
    if (
        not isinstance(payload, dict)
        or not isinstance(payload.get("messages"), list)
        or "model" not in payload
    ):
        return _error(
            state, 400, "'model' and 'messages' are required properties", kind="invalid_request_error"
        )
    model = payload["model"]
    if model not in settings.models:
        message = (
            f"The model `{model}` does not exist or you do not have access to it."
            if openai
            else f"The model `{model}` does not exist."
        )
        return _error(state, 404, message, kind="invalid_request_error", code="model_not_found")
    k = int(payload.get("top_logprobs") or 0)
    if k > MAX_TOP_LOGPROBS:
        return _error(
            state,
            400,
            f"Invalid 'top_logprobs': integer above maximum value. Expected a value <= {MAX_TOP_LOGPROBS}, "
            f"but got {k} instead.",
            kind="invalid_request_error",
            code="integer_above_max_value",
            param="top_logprobs",
        )
    if openai and "return_tokens_as_token_ids" in payload:
        return _error(
            state,
            400,
            "Unrecognized request argument supplied: return_tokens_as_token_ids",
            kind="invalid_request_error",
        )
    prompt_chars = sum(len(str(message.get("content", ""))) for message in payload["messages"])
    if prompt_chars > settings.max_prompt_chars:
        limit, used = settings.max_prompt_chars // 4, _prompt_tokens(payload["messages"])
        if openai:
            message = (
                f"This model's maximum context length is {limit} tokens. However, your messages resulted "
                f"in {used} tokens. Please reduce the length of the messages."
            )
        else:
            message = (
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{used} tokens in the messages. Please reduce the length of the messages."
            )
        return _error(state, 400, message, kind="invalid_request_error", code="context_length_exceeded")

    rule = state.take_rule(model)
    mode = rule.mode if rule is not None else "ok"
    echo = ""
    if rule is not None and rule.echo_key:
        echo = f" (request made with key {request.headers.get('authorization', '').removeprefix('Bearer ')})"
    if mode == "429":
        headers = {} if rule.retry_after is None else {"Retry-After": f"{rule.retry_after:g}"}
        response = _error(
            state,
            429,
            f"Rate limit reached for {model} on requests per min (RPM): Limit 3, Used 3, Requested 1.{echo}",
            kind="requests",
            code="rate_limit_exceeded",
        )
        response.headers.update(headers)
        return response
    if mode == "500":
        return _error(
            state,
            rule.status,
            f"The server had an error while processing your request. Sorry about that!{echo}",
            kind="server_error",
        )
    if mode == "garbage":
        return Response(b'{"id": "chatcmpl-garbage", "choices": [{"mess', media_type="application/json")
    if mode == "missing_fields":
        return _json({"id": "chatcmpl-partial", "object": "chat.completion", "model": model})
    if mode == "slow":
        await asyncio.sleep(rule.delay)
    if mode == "padded":
        return _padded(_encode(_answer(payload, settings, with_logprobs=True)), rule.size)
    return _json(_answer(payload, settings, with_logprobs=mode != "no_logprobs"))


def _padded(answer: bytes, size: int | None) -> StreamingResponse:
    """`answer` and then spaces (still valid JSON), a MiB at a time: up to `size` bytes in all, or
    without end when `size` is None."""
    chunk = b" " * 2**20

    async def body() -> AsyncIterator[bytes]:
        yield answer
        left = None if size is None else size - len(answer)
        while left is None or left > 0:
            piece = chunk if left is None or left >= len(chunk) else chunk[:left]
            yield piece
            if left is not None:
                left -= len(piece)
            # Once the client is gone, sending returns at once: give the loop a turn to notice.
            await asyncio.sleep(0)

    headers = {} if size is None else {"content-length": str(size)}
    return StreamingResponse(body(), media_type="application/json", headers=headers)


def build_app(startup: Settings) -> Starlette:
    state = State(startup=startup, settings=replace(startup))

    async def chat_completions(request: Request) -> Response:
        generation = state.generation
        prompt = None
        state.completions += 1
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            try:
                payload = msgspec.json.decode(await request.body())
            except msgspec.DecodeError:
                response = _error(
                    state,
                    400,
                    "We could not parse the JSON body of your request.",
                    kind="invalid_request_error",
                )
            else:
                if (
                    isinstance(payload, dict)
                    and isinstance(payload.get("messages"), list)
                    and payload["messages"]
                ):
                    last = payload["messages"][-1]
                    prompt = str(last.get("content", "")) if isinstance(last, dict) else ""
                    state.by_prompt[prompt] += 1
                held = state.hold_after is not None and state.let_through >= state.hold_after
                if held:
                    await state.gate.wait()
                state.let_through += 1
                if state.settings.latency_ms:
                    await asyncio.sleep(state.settings.latency_ms / 1000)
                if held and await request.is_disconnected():
                    # Its caller is gone (a killed worker): nothing is delivered, nothing counts as answered.
                    response = Response(status_code=499)
                else:
                    response = await _complete(state, request, payload)
        finally:
            if state.generation == generation:
                state.in_flight -= 1
        if state.generation == generation:
            state.by_status[str(response.status_code)] += 1
            if response.status_code == 200 and prompt is not None:
                state.answered_by_prompt[prompt] += 1
        return response

    async def models(request: Request) -> Response:
        return _json(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "tests"}
                    for m in state.settings.models
                ],
            }
        )

    async def control(request: Request) -> Response:
        script = msgspec.json.decode(await request.body())
        if script.pop("clear", False):
            state.rules.clear()
        if "hold_after" in script:
            state.hold_after, state.let_through = script.pop("hold_after"), 0
            state.gate.clear()
        if script.pop("open_gate", False):
            state.hold_after = None
            state.gate.set()
        for name in ("api_key", "flavor", "max_prompt_chars", "answer_tokens", "latency_ms"):
            if name in script:
                setattr(state.settings, name, script.pop(name))
        if "models" in script:
            state.settings.models = tuple(script.pop("models"))
        if "mode" in script:
            modes = ("ok", "429", "500", "slow", "garbage", "missing_fields", "no_logprobs", "padded")
            if script["mode"] not in modes:
                return _json({"error": f"unknown mode {script['mode']!r}"}, 400)
            try:
                state.rules.append(Rule(**script))
            except TypeError as error:
                return _json({"error": str(error)}, 400)
        elif script:
            return _json({"error": f"unknown control fields {sorted(script)}"}, 400)
        return _json({"rules": len(state.rules)})

    async def calls(request: Request) -> Response:
        return _json(
            {
                "completions": state.completions,
                "by_prompt": dict(state.by_prompt),
                "answered_by_prompt": dict(state.answered_by_prompt),
                "by_status": dict(state.by_status),
                "in_flight": state.in_flight,
                "max_in_flight": state.max_in_flight,
            }
        )

    async def reset(request: Request) -> Response:
        state.reset()
        return _json({"reset": True})

    async def vocab(request: Request) -> Response:
        return _json(VOCAB)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/_control", control, methods=["POST"]),
            Route("/_calls", calls, methods=["GET"]),
            Route("/_reset", reset, methods=["POST"]),
            Route("/_vocab", vocab, methods=["GET"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    parser.add_argument(
        "--model", action="append", help="a model to serve (repeatable; default fake-teacher)"
    )
    parser.add_argument("--flavor", choices=("vllm", "openai"), default="vllm")
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every completion")
    arguments = parser.parse_args()
    settings = Settings(
        api_key=arguments.api_key,
        models=tuple(arguments.model or ("fake-teacher",)),
        flavor=arguments.flavor,
        answer_tokens=arguments.answer_tokens,
        latency_ms=arguments.latency_ms,
    )
    uvicorn.run(
        build_app(settings),
        host="127.0.0.1",
        port=arguments.port,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=60,
    )


if __name__ == "__main__":
    main()
