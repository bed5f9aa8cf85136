"""The OpenAI chat-completions wire format: the request we send and how we read what comes back.

Written to the documented schema (OpenAI's `POST /v1/chat/completions`, which DeepSeek, vLLM, SGLang,
TGI and llama.cpp server all speak) plus one vLLM extension, `return_tokens_as_token_ids`, which makes
logprob tokens come back as ``"token_id:1234"`` instead of token text. Everything here is pure: bytes and
dicts in, `TeacherAnswer` pieces or `TeacherCallError` out. How logprob tokens become ids is
`openai_capture`'s job.

Responses are decoded with msgspec straight from bytes into the typed structs below, which skips the
fields we do not read without building them, and keeps the ``bytes`` of every logprob entry (most of
a ~100 KB body) as undecoded slices until ids are looked up by bytes.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import msgspec

from stillhouse.teacher.backends.openai_capture import capture_logprobs, quote
from stillhouse.teacher.calls import FailureKind, TeacherAnswer, TeacherCall, TeacherCallError
from stillhouse.teacher.token_vocabulary import TokenVocabulary

# --- request -----------------------------------------------------------------------------------


def chat_request(call: TeacherCall, *, token_ids_from_server: bool) -> dict[str, Any]:
    """The JSON body of `POST /chat/completions` for `call`. Logprobs are asked for only when the call
    wants top-k alternatives; `token_ids_from_server` adds vLLM's `return_tokens_as_token_ids`. The call's
    server-specific fields come first, so that none can replace a field set here."""
    body: dict[str, Any] = {
        **dict(call.extra_body),
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

# The most a response may take, in bytes: a server that sends more is broken or hostile, and reading it
# whole would hold it all in memory. A logprob entry ({token, logprob, bytes}) is about 75 bytes of JSON,
# so a 64-token answer with top-20 logprobs is about 100 KB; every call may take MIN_RESPONSE_BYTES, and
# a call that asks for more entries (max_tokens positions of top_logprobs + 1 entries each) may take
# LOGPROB_ENTRY_BYTES per entry, several times the usual size, for long tokens and escaped text.
MIN_RESPONSE_BYTES = 16 * 2**20
LOGPROB_ENTRY_BYTES = 512


def response_byte_limit(call: TeacherCall) -> int:
    """The most bytes an answer to `call` may take (see MIN_RESPONSE_BYTES)."""
    return max(MIN_RESPONSE_BYTES, call.max_tokens * (call.top_logprobs + 1) * LOGPROB_ENTRY_BYTES)


def response_too_large(
    url: str, call: TeacherCall, limit: int, *, declared: int | None = None
) -> TeacherCallError:
    """The failure of a response over `response_byte_limit(call)`: announced by its Content-Length, or
    found while it arrived."""
    size = f"sent more than {limit:,} bytes" if declared is None else f"announced {declared:,} bytes"
    return TeacherCallError(
        FailureKind.MALFORMED_RESPONSE,
        f"{url} {size}, over the limit of {limit:,} bytes for an answer of max_tokens {call.max_tokens} "
        f"with top_logprobs {call.top_logprobs}",
    )


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    # Kept undecoded (a slice of the body): read only when ids come from the teacher's vocabulary.
    bytes: msgspec.Raw = msgspec.Raw(b"null")


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: msgspec.Raw = msgspec.Raw(b"null")
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


def parse_chat_completion(
    body: bytes,
    call: TeacherCall,
    vocabulary: TokenVocabulary | None,
    *,
    ids_from_server: bool,
    latency_seconds: float,
) -> TeacherAnswer:
    """The answer in a 200 response body, its token ids obtained as `openai_capture` says (from the
    server when `ids_from_server`, else through `vocabulary`). MALFORMED_RESPONSE when the body is not
    the documented shape; MISSING_LOGPROBS when the call asked for logprobs and the body has none;
    UNMAPPABLE_TOKEN when a generated token's id cannot be known."""
    try:
        completion = _completion_decoder.decode(body)
    except msgspec.ValidationError as error:
        raise TeacherCallError(
            FailureKind.MALFORMED_RESPONSE, f"the response is not a chat completion: {error}"
        ) from None
    except msgspec.DecodeError:
        raise TeacherCallError(
            FailureKind.MALFORMED_RESPONSE,
            f"the response is not JSON (starts {quote(body[:80].decode(errors='replace'))}); "
            "is base_url an OpenAI-compatible API root?",
        ) from None
    if not completion.choices:
        raise TeacherCallError(FailureKind.MALFORMED_RESPONSE, "the response has no choices")
    choice = completion.choices[0]
    text = choice.message.content or ""
    answer = TeacherAnswer(
        text=text,
        finish_reason=choice.finish_reason,
        prompt_tokens=completion.usage.prompt_tokens,
        completion_tokens=completion.usage.completion_tokens,
        latency_seconds=latency_seconds,
    )
    if call.top_logprobs == 0:
        return answer
    if choice.logprobs is None or choice.logprobs.content is None:
        raise TeacherCallError(
            FailureKind.MISSING_LOGPROBS,
            f"asked model {call.model!r} for top_logprobs={call.top_logprobs} but the response has "
            "no logprobs: does this server support them?",
        )
    capture = capture_logprobs(
        choice.logprobs.content,
        call.top_logprobs,
        text=text,
        finish_reason=choice.finish_reason,
        temperature=call.temperature,
        vocabulary=vocabulary,
        ids_from_server=ids_from_server,
    )
    answer.logprobs = capture.logprobs
    answer.token_id_source = capture.token_id_source
    answer.masked_alternatives = capture.masked_alternatives
    answer.top1_mismatches = capture.top1_mismatches
    answer.stop_token_added = capture.stop_token_added
    return answer


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
    (as aiohttp's do). Quotes the server's message for the kinds a user must act on, never for 401."""
    message, code = _error_details(body)
    quoted = f": {quote(message)}" if message else ""
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


# The longest wait a server's answer can ask for. A longer one (a daily quota's reset, a mistaken
# header) is waited as this long: the next attempt asks the server again, and it says what is left.
MAX_RETRY_AFTER_SECONDS = 300.0


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked us to wait, at most MAX_RETRY_AFTER_SECONDS: `retry-after-ms` (OpenAI),
    `Retry-After` (seconds or an HTTP date), else the `x-ratelimit-reset-*` (OpenAI, "6m0s") of each
    budget that is used up."""
    wait = _requested_wait(headers)
    return None if wait is None else min(wait, MAX_RETRY_AFTER_SECONDS)


def _requested_wait(headers: Mapping[str, str]) -> float | None:
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
