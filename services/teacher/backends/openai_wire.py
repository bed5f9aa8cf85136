"""The OpenAI chat-completions wire format: the request we send and how we read what comes back.

Written to the documented schema (OpenAI's `POST /v1/chat/completions`, which DeepSeek, vLLM, SGLang,
TGI and llama.cpp server all speak) plus one vLLM extension, `return_tokens_as_token_ids`, which makes
logprob tokens come back as ``"token_id:1234"`` instead of token text. Everything here is pure: bytes and
dicts in, `TeacherAnswer` pieces or `TeacherCallError` out.

Responses are decoded with msgspec straight from bytes into the typed structs below, which skips the
fields we do not read (``bytes`` of every logprob entry, most of a ~100 KB body) without building them.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import msgspec
import numpy as np

from stillhouse.storage.sparse_logprobs import LOGPROB_FLOOR, SparseLogprobs
from stillhouse.teacher.calls import FailureKind, TeacherAnswer, TeacherCall, TeacherCallError

# vLLM's `return_tokens_as_token_ids` writes every logprob token as this prefix and the id.
TOKEN_ID_PREFIX = "token_id:"

# Longest piece of a server's error message quoted back in ours.
_QUOTE_LIMIT = 300


# --- request -----------------------------------------------------------------------------------


def chat_request(call: TeacherCall, *, token_ids_from_server: bool) -> dict[str, Any]:
    """The JSON body of `POST /chat/completions` for `call`. Logprobs are asked for only when the call
    wants top-k alternatives; `token_ids_from_server` adds vLLM's `return_tokens_as_token_ids`."""
    body: dict[str, Any] = {
        "model": call.model,
        "messages": [{"role": message.role, "content": message.content} for message in call.messages],
        "temperature": call.temperature,
        "top_p": call.top_p,
        "max_tokens": call.max_tokens,
        "n": 1,
        "stream": False,
    }
    if call.seed is not None:
        body["seed"] = call.seed
    if call.top_logprobs > 0:
        body["logprobs"] = True
        body["top_logprobs"] = call.top_logprobs
        if token_ids_from_server:
            body["return_tokens_as_token_ids"] = True
    return body


# --- response ----------------------------------------------------------------------------------


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(msgspec.Struct):
    content: list[TokenLogprob] | None = None


class AssistantMessage(msgspec.Struct):
    content: str | None = None


class Choice(msgspec.Struct):
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int


class ChatCompletion(msgspec.Struct):
    choices: list[Choice]
    usage: Usage


_completion_decoder = msgspec.json.Decoder(ChatCompletion)

# Turns logprob tokens into their ids, all at once (a response has T * (k + 1) of them); raises
# TeacherCallError naming a token it cannot turn.
TokenIdsOf = Callable[[list[str]], np.ndarray]


def parse_chat_completion(
    body: bytes, call: TeacherCall, token_ids_of: TokenIdsOf, *, latency_seconds: float
) -> TeacherAnswer:
    """The answer in a 200 response body. MALFORMED_RESPONSE when the body is not the documented
    shape; MISSING_LOGPROBS when the call asked for logprobs and the body has none."""
    try:
        completion = _completion_decoder.decode(body)
    except msgspec.ValidationError as error:
        raise TeacherCallError(
            FailureKind.MALFORMED_RESPONSE, f"the response is not a chat completion: {error}"
        ) from None
    except msgspec.DecodeError:
        raise TeacherCallError(
            FailureKind.MALFORMED_RESPONSE,
            f"the response is not JSON (starts {_quote(body[:80].decode(errors='replace'))}); "
            "is base_url an OpenAI-compatible API root?",
        ) from None
    if not completion.choices:
        raise TeacherCallError(FailureKind.MALFORMED_RESPONSE, "the response has no choices")
    choice = completion.choices[0]
    logprobs = None
    if call.top_logprobs > 0:
        if choice.logprobs is None or choice.logprobs.content is None:
            raise TeacherCallError(
                FailureKind.MISSING_LOGPROBS,
                f"asked model {call.model!r} for top_logprobs={call.top_logprobs} but the response has "
                "no logprobs: does this server support them?",
            )
        logprobs = sparse_logprobs(choice.logprobs.content, call.top_logprobs, token_ids_of)
    return TeacherAnswer(
        text=choice.message.content or "",
        finish_reason=choice.finish_reason,
        prompt_tokens=completion.usage.prompt_tokens,
        completion_tokens=completion.usage.completion_tokens,
        latency_seconds=latency_seconds,
        logprobs=logprobs,
    )


def sparse_logprobs(content: list[TokenLogprob], k: int, token_ids_of: TokenIdsOf) -> SparseLogprobs:
    """Per-token top-k alternatives as the sparse layout: [T] generated ids, [T, k] ids and logprobs,
    most likely first, and the tail log(1 - sum(exp(top k))), clamped to stay finite.

    A position with more than k alternatives keeps the k most likely. One with fewer (a vocabulary
    smaller than k) is padded with token 0 at `LOGPROB_FLOOR`, whose probability no loss can see."""
    steps = len(content)
    kept = []
    for step, position in enumerate(content):
        alternatives = position.top_logprobs
        if not alternatives:
            raise TeacherCallError(
                FailureKind.MISSING_LOGPROBS,
                f"generated token {step} has no top_logprobs alternatives though {k} were asked for",
            )
        if len(alternatives) > k:
            alternatives = sorted(alternatives, key=lambda entry: -entry.logprob)[:k]
        kept.append(alternatives)
    token_ids = token_ids_of([position.token for position in content])
    # Every alternative of every position in one flat list, then scattered into [T, k].
    counts = np.fromiter((len(alternatives) for alternatives in kept), dtype=np.int64, count=steps)
    rows = np.repeat(np.arange(steps), counts)
    columns = np.arange(rows.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
    topk_ids = np.zeros((steps, k), dtype=np.int32)
    topk_logprobs = np.full((steps, k), LOGPROB_FLOOR, dtype=np.float64)
    topk_ids[rows, columns] = token_ids_of([entry.token for alternatives in kept for entry in alternatives])
    topk_logprobs[rows, columns] = [entry.logprob for alternatives in kept for entry in alternatives]
    # Servers list alternatives most likely first in practice; the layout promises it, so make sure.
    order = np.argsort(-topk_logprobs, axis=1, kind="stable")
    topk_ids = np.take_along_axis(topk_ids, order, axis=1)
    topk_logprobs = np.clip(np.take_along_axis(topk_logprobs, order, axis=1), LOGPROB_FLOOR, 0.0)
    top_mass = np.exp(topk_logprobs).sum(axis=1)
    with np.errstate(divide="ignore"):
        tail = np.log1p(-np.minimum(top_mass, 1.0))
    return SparseLogprobs(
        token_ids=token_ids,
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs.astype(np.float32),
        tail_logprob=np.maximum(tail, LOGPROB_FLOOR).astype(np.float32),
    )


def token_ids_from_server(tokens: list[str]) -> np.ndarray:
    """The ids in vLLM ``token_id:1234`` tokens."""
    if not tokens:
        return np.empty(0, dtype=np.int32)
    # Parsed as one string, not token by token: this runs for every one of a response's many tokens.
    joined = ",".join(tokens)
    pieces = joined.replace(TOKEN_ID_PREFIX, "").split(",")
    every_token_is_prefixed_once = (
        len(pieces) == len(tokens)
        and joined.startswith(TOKEN_ID_PREFIX)
        and joined.count("," + TOKEN_ID_PREFIX) == len(tokens) - 1
        and joined.count(TOKEN_ID_PREFIX) == len(tokens)
    )
    if every_token_is_prefixed_once:
        try:
            ids = np.array(pieces, dtype=np.int64)
        except ValueError:
            pass
        else:
            if ids.min() >= 0 and ids.max() < 2**31:
                return ids.astype(np.int32)
    unreadable = next((token for token in tokens if not _TOKEN_ID.fullmatch(token)), tokens[0])
    raise TeacherCallError(
        FailureKind.MALFORMED_RESPONSE,
        f"asked for token ids (return_tokens_as_token_ids, a vLLM extension) but got the token "
        f"{_quote(unreadable)}: this server does not give ids; give the backend a tokenizer instead",
    )


_TOKEN_ID = re.compile(re.escape(TOKEN_ID_PREFIX) + r"\d{1,9}")


def token_ids_from_tokenizer(tokenizer: Callable[[str], int | None]) -> TokenIdsOf:
    """Token texts to ids through `tokenizer`; a token it does not know is an error (wrong tokenizer)."""

    def token_ids_of(tokens: list[str]) -> np.ndarray:
        ids = [tokenizer(token) for token in tokens]
        if None in ids:
            unknown = tokens[ids.index(None)]
            raise TeacherCallError(
                FailureKind.MALFORMED_RESPONSE,
                f"the tokenizer has no id for the token {_quote(unknown)}: "
                "is it the teacher model's tokenizer?",
            )
        return np.array(ids, dtype=np.int32)

    return token_ids_of


# --- errors ------------------------------------------------------------------------------------

# How OpenAI, vLLM, SGLang, DeepSeek, llama.cpp server and TGI say a prompt does not fit the context.
_CONTEXT_TOO_LONG = re.compile(
    r"context[ _]length|context size|context window|`inputs` tokens \+ `max_new_tokens` must be",
    re.IGNORECASE,
)
_MODEL_MISSING = re.compile(r"model\b.*\b(does not exist|not exist|not found)", re.IGNORECASE)


def error_from_response(
    status: int, headers: Mapping[str, str], body: bytes, *, model: str, url: str
) -> TeacherCallError:
    """The failure a non-200 response stands for. `headers` must look names up case-insensitively
    (as httpx's do). Quotes the server's message for the kinds a user must act on, never for 401."""
    message, code = _error_details(body)
    quoted = f": {_quote(message)}" if message else ""
    retry_after = retry_after_seconds(headers)
    if status in (401, 403):
        return TeacherCallError(
            FailureKind.UNAUTHENTICATED,
            f"{url} refused the request ({status}): check the API key named by apiKeySecret",
        )
    if code == "model_not_found" or status == 404 or (400 <= status < 500 and _MODEL_MISSING.search(message)):
        return TeacherCallError(
            FailureKind.MODEL_NOT_FOUND,
            f"model {model!r} was not found at {url} ({status}{quoted}); if the model exists, check "
            "that base_url is the API root, such as https://api.openai.com/v1",
        )
    if status == 429:
        if code == "insufficient_quota":
            # Waiting does not bring quota back: retrying would only spend the retries.
            return TeacherCallError(FailureKind.BAD_REQUEST, f"the account's quota is used up (429){quoted}")
        return TeacherCallError(
            FailureKind.RATE_LIMITED, f"rate limited by {url} (429){quoted}", retry_after=retry_after
        )
    if 300 <= status < 400:
        where = headers.get("location", "elsewhere")
        return TeacherCallError(
            FailureKind.BAD_REQUEST, f"{url} redirects ({status}) to {where}: set base_url to the final URL"
        )
    if status == 408:
        return TeacherCallError(FailureKind.TIMEOUT, f"{url} timed out the request (408)")
    if status >= 500:
        return TeacherCallError(
            FailureKind.SERVER_ERROR, f"{url} failed with {status}{quoted}", retry_after=retry_after
        )
    if code == "context_length_exceeded" or _CONTEXT_TOO_LONG.search(message):
        return TeacherCallError(
            FailureKind.CONTEXT_TOO_LONG,
            f"the prompt and max_tokens do not fit model {model!r}'s context ({status}{quoted})",
        )
    return TeacherCallError(FailureKind.BAD_REQUEST, f"{url} refused the request ({status}){quoted}")


def _error_details(body: bytes) -> tuple[str, str | None]:
    """(message, code) of an error body in any of the shapes servers use: OpenAI's
    {"error": {"message", "code"}}, older vLLM's top-level {"message", "code"}, TGI's {"error": "..."},
    FastAPI's {"detail": ...}; or the body's text when it is not JSON."""
    try:
        document = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body.decode(errors="replace").strip(), None
    if not isinstance(document, dict):
        return str(document), None
    error = document.get("error", document)
    if isinstance(error, str):
        return error, None
    if not isinstance(error, dict):
        return str(document), None
    message = error.get("message") or document.get("detail") or ""
    code = error.get("code")
    return str(message), (str(code) if isinstance(code, str) else None)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked us to wait: `retry-after-ms` (OpenAI), `Retry-After` (seconds or an
    HTTP date), else the `x-ratelimit-reset-*` (OpenAI, "6m0s") of each budget that is used up."""
    if (milliseconds := _number(headers.get("retry-after-ms"))) is not None:
        return max(milliseconds / 1000, 0.0)
    if (value := headers.get("retry-after")) is not None:
        if (seconds := _number(value)) is not None:
            return max(seconds, 0.0)
        try:
            return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
        except (TypeError, ValueError):
            return None
    resets = [
        _duration(headers.get(f"x-ratelimit-reset-{budget}", ""))
        for budget in ("requests", "tokens")
        if headers.get(f"x-ratelimit-remaining-{budget}") == "0"
    ]
    resets = [reset for reset in resets if reset is not None]
    return max(resets) if resets else None


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _duration(value: str) -> float | None:
    """Seconds in a Go-style duration such as "1s", "6m0s", "20ms", "1h2m3.5s"."""
    parts = _DURATION_PART.findall(value)
    if not parts or "".join(number + unit for number, unit in parts) != value.strip():
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(number) * scale[unit] for number, unit in parts)


def _quote(text: str) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= _QUOTE_LIMIT else text[:_QUOTE_LIMIT] + "...")
