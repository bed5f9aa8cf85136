"""The OpenAI-compatible backend: the wire format on canned documents, then every outcome against a
real local server that speaks it (tests/teacher/fake_openai.py)."""

from __future__ import annotations

import logging
import math
import socket
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import msgspec
import numpy as np
import pytest
import structlog

from stillhouse.common.datasets.sparse_logprobs import LOGPROB_FLOOR
from stillhouse.teacher.backends import openai_wire
from stillhouse.teacher.backends.openai_capture import capture_logprobs, token_ids_from_server
from stillhouse.teacher.backends.openai_http import OpenAICompatibleBackend
from stillhouse.teacher.calls import ChatMessage, FailureKind, TeacherCall, TeacherCallError, TokenIdSource
from stillhouse.teacher.token_vocabulary import TokenVocabulary

API_KEY = "sk-test-5f0c2e9d4b7a4f61a8e3"


def make_call(base_url: str, prompt: str = "Say hello.", **overrides: object) -> TeacherCall:
    fields: dict = {
        "backend": "openai",
        "base_url": base_url,
        "model": "fake-teacher",
        "revision": "",
        "messages": (ChatMessage("system", "You are terse."), ChatMessage("user", prompt)),
        "temperature": 0.7,
        "top_p": 1.0,
        "max_tokens": 16,
        "seed": 7,
        "top_logprobs": 5,
    }
    return TeacherCall(**{**fields, **overrides})


def _raises(kind: FailureKind, error: pytest.ExceptionInfo[TeacherCallError]) -> TeacherCallError:
    assert error.value.kind is kind, error.value
    return error.value


# --- the wire format, on canned documents -------------------------------------------------------

# OpenAI's documented chat completion with logprobs (first tokens of the example in the API reference).
OPENAI_LOGPROBS_EXAMPLE = b"""{
  "id": "chatcmpl-123", "object": "chat.completion", "created": 1702685778, "model": "gpt-4o-mini",
  "choices": [{
    "index": 0,
    "message": {"role": "assistant", "content": "Hello!"},
    "logprobs": {"content": [
      {"token": "Hello", "logprob": -0.31725305, "bytes": [72, 101, 108, 108, 111],
       "top_logprobs": [{"token": "Hello", "logprob": -0.31725305, "bytes": [72, 101, 108, 108, 111]},
                        {"token": "Hi", "logprob": -1.3190403, "bytes": [72, 105]}]},
      {"token": "!", "logprob": -0.02380986, "bytes": [33],
       "top_logprobs": [{"token": "!", "logprob": -0.02380986, "bytes": [33]},
                        {"token": " there", "logprob": -3.787621, "bytes": [32, 116, 104, 101, 114, 101]}]}
    ]},
    "finish_reason": "stop"
  }],
  "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
  "system_fingerprint": null
}"""

# vLLM's answer to the same request with `return_tokens_as_token_ids: true` (newer vLLM list the
# sampled token among the alternatives, so a position can hold k + 1 of them).
VLLM_TOKEN_IDS_EXAMPLE = b"""{
  "id": "chatcmpl-b1a", "object": "chat.completion", "created": 1730000000,
  "model": "Qwen/Qwen2.5-7B-Instruct",
  "choices": [{
    "index": 0,
    "message": {"role": "assistant", "content": "Hello!", "tool_calls": [], "reasoning_content": null},
    "logprobs": {"content": [
      {"token": "token_id:9707", "logprob": -0.31725305, "bytes": [72, 101, 108, 108, 111],
       "top_logprobs": [{"token": "token_id:9707", "logprob": -0.31725305, "bytes": [72, 101, 108, 108, 111]},
                        {"token": "token_id:13048", "logprob": -1.3190403, "bytes": [72, 105]}]},
      {"token": "token_id:0", "logprob": -6.5, "bytes": [33],
       "top_logprobs": [{"token": "token_id:0", "logprob": -6.5, "bytes": [33]},
                        {"token": "token_id:1773", "logprob": -0.02380986, "bytes": [46]},
                        {"token": "token_id:1005", "logprob": -3.787621, "bytes": [32]}]}
    ]},
    "finish_reason": "length", "stop_reason": null
  }],
  "usage": {"prompt_tokens": 20, "total_tokens": 22, "completion_tokens": 2, "prompt_tokens_details": null},
  "prompt_logprobs": null
}"""

OPENAI_VOCAB = {"Hello": 9906, "Hi": 13347, "!": 0, " there": 1070}


def vocabulary_of(texts: dict[str, int], eos_id: int | None = None) -> TokenVocabulary:
    """A vocabulary of exactly these tokens (text -> id), which never needs to re-tokenise."""
    token_bytes: list[bytes | None] = [None] * (max(texts.values(), default=-1) + 1)
    for text, token_id in texts.items():
        token_bytes[token_id] = text.encode()

    def encode(text: str) -> list[int]:
        raise AssertionError(f"nothing should be re-tokenised, asked for {text!r}")

    return TokenVocabulary(token_bytes, encode, eos_id=eos_id)


NO_TOKENS = vocabulary_of({})


def parse(body: bytes, call: TeacherCall, vocabulary: TokenVocabulary | None = None, **options):
    return openai_wire.parse_chat_completion(
        body, call, vocabulary, ids_from_server=vocabulary is None, latency_seconds=0.5, **options
    )


def test_request_body_follows_the_documented_schema():
    call = make_call("http://teacher/v1", top_logprobs=20, seed=None)
    body = openai_wire.chat_request(call, token_ids_from_server=False)
    assert body == {
        "model": "fake-teacher",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello."},
        ],
        "temperature": 0.7,
        "top_p": 1.0,
        "max_tokens": 16,
        "n": 1,
        "stream": False,
        "logprobs": True,
        "top_logprobs": 20,
    }
    with_ids = openai_wire.chat_request(make_call("http://teacher/v1"), token_ids_from_server=True)
    assert with_ids["seed"] == 7 and with_ids["return_tokens_as_token_ids"] is True
    # No logprobs asked for: none of the logprob fields, and no extension either.
    plain = openai_wire.chat_request(
        make_call("http://teacher/v1", top_logprobs=0), token_ids_from_server=True
    )
    assert not {"logprobs", "top_logprobs", "return_tokens_as_token_ids"} & plain.keys()


def test_openai_example_parses_with_a_tokenizer():
    call = make_call("http://teacher/v1", top_logprobs=2)
    answer = parse(OPENAI_LOGPROBS_EXAMPLE, call, vocabulary_of(OPENAI_VOCAB))
    assert (answer.text, answer.finish_reason) == ("Hello!", "stop")
    assert answer.token_id_source is TokenIdSource.BYTES
    assert (answer.masked_alternatives, answer.stop_token_added) == (0, False)
    assert (answer.prompt_tokens, answer.completion_tokens, answer.latency_seconds) == (9, 2, 0.5)
    logprobs = answer.logprobs
    assert logprobs is not None and logprobs.k == 2
    assert logprobs.token_ids.tolist() == [9906, 0]
    assert logprobs.topk_ids.tolist() == [[9906, 13347], [0, 1070]]
    np.testing.assert_allclose(logprobs.topk_logprobs, [[-0.31725305, -1.3190403], [-0.02380986, -3.787621]])
    expected_tail = [
        math.log(1 - math.exp(-0.31725305) - math.exp(-1.3190403)),
        math.log(1 - math.exp(-0.02380986) - math.exp(-3.787621)),
    ]
    np.testing.assert_allclose(logprobs.tail_logprob, expected_tail, rtol=1e-5)


def test_vllm_token_ids_parse_and_extra_alternatives_keep_the_top_k():
    call = make_call("http://teacher/v1", top_logprobs=2)
    answer = parse(VLLM_TOKEN_IDS_EXAMPLE, call)
    assert answer.token_id_source is TokenIdSource.SERVER
    assert (answer.finish_reason, answer.prompt_tokens, answer.completion_tokens) == ("length", 20, 2)
    logprobs = answer.logprobs
    assert logprobs.token_ids.tolist() == [9707, 0]
    # The sampled token (-6.5) was listed first but is not among the two most likely.
    assert logprobs.topk_ids.tolist() == [[9707, 13048], [1773, 1005]]
    assert logprobs.topk_logprobs[1, 0] == pytest.approx(-0.02380986)


def test_fewer_alternatives_than_k_are_masked_and_a_full_top_k_has_a_floor_tail():
    top = openai_wire.TopLogprob
    content = [
        openai_wire.TokenLogprob(
            "token_id:3", -0.1, top_logprobs=[top("token_id:3", -0.1), top("token_id:4", -2.4)]
        ),
        # Rounded logprobs whose probabilities sum past 1: the tail is empty, not NaN.
        openai_wire.TokenLogprob(
            "token_id:5", -0.0001, top_logprobs=[top("token_id:6", -3.0), top("token_id:5", -0.0001)]
        ),
    ]
    capture = capture_logprobs(
        content, 3, text="", finish_reason="length", temperature=0, vocabulary=None, ids_from_server=True
    )
    logprobs = capture.logprobs
    assert logprobs.topk_ids.tolist() == [[3, 4, -1], [5, 6, -1]]
    assert capture.masked_alternatives == 2 and capture.top1_mismatches == 0
    assert logprobs.topk_logprobs[0, 2] == LOGPROB_FLOOR
    assert np.isfinite(logprobs.tail_logprob).all()
    assert logprobs.tail_logprob[1] == LOGPROB_FLOOR
    assert logprobs.tail_logprob[0] == pytest.approx(math.log(1 - math.exp(-0.1) - math.exp(-2.4)), rel=1e-5)


_USAGE = b'"usage": {"prompt_tokens": 1, "completion_tokens": 1}'
_NOT_ANSWERS = [
    (b"<html>Bad gateway</html>", FailureKind.MALFORMED_RESPONSE, "not JSON"),
    (b'{"choices": [], ' + _USAGE + b"}", FailureKind.MALFORMED_RESPONSE, "no choices"),
    (
        b'{"choices": [{"message": {"content": "x"}, "finish_reason": "stop"}]}',
        FailureKind.MALFORMED_RESPONSE,
        "usage",
    ),
    (
        b'{"choices": [{"message": {"content": "x"}, "finish_reason": "stop", "logprobs": null}], '
        + _USAGE
        + b"}",
        FailureKind.MISSING_LOGPROBS,
        "no logprobs",
    ),
    (
        b'{"choices": [{"message": {"content": "x"}, "finish_reason": "stop", "logprobs": {"content": '
        b'[{"token": "x", "logprob": -1.0, "top_logprobs": []}]}}], ' + _USAGE + b"}",
        FailureKind.MISSING_LOGPROBS,
        "alternatives",
    ),
]


@pytest.mark.parametrize(("body", "kind", "says"), _NOT_ANSWERS)
def test_responses_that_are_not_answers_are_named(body: bytes, kind: FailureKind, says: str):
    call = make_call("http://teacher/v1", top_logprobs=1)
    with pytest.raises(TeacherCallError) as error:
        parse(body, call)
    assert says in _raises(kind, error).message


def test_token_texts_where_ids_were_asked_for_say_what_to_do():
    call = make_call("http://teacher/v1", top_logprobs=2)
    with pytest.raises(TeacherCallError) as error:
        parse(OPENAI_LOGPROBS_EXAMPLE, call)
    assert "tokenizer" in _raises(FailureKind.MALFORMED_RESPONSE, error).message
    # Another model's vocabulary: the generated token is unknown, and re-tokenising finds no token.
    other = TokenVocabulary([b"Hey"], encode=lambda text: [])
    with pytest.raises(TeacherCallError) as error:
        parse(OPENAI_LOGPROBS_EXAMPLE, call, other)
    message = _raises(FailureKind.UNMAPPABLE_TOKEN, error).message
    assert "'Hello'" in message and "tokenizer" in message


def _error(status: int, body: dict | str, headers: dict[str, str] | None = None) -> TeacherCallError:
    raw = body.encode() if isinstance(body, str) else msgspec.json.encode(body)
    lowered = {name.lower(): value for name, value in (headers or {}).items()}
    return openai_wire.error_from_response(
        status, lowered, raw, model="big-model", url="http://t/v1/chat/completions"
    )


def _openai(message: str, **fields: object) -> dict:
    return {"error": {"message": message, **fields}}


def _vllm_legacy(message: str) -> dict:
    return {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": 400}


ERROR_BODIES = [
    # OpenAI
    (
        401,
        _openai("Incorrect API key provided: sk-abc***", code="invalid_api_key"),
        FailureKind.UNAUTHENTICATED,
    ),
    (
        404,
        _openai("The model `big-model` does not exist", code="model_not_found"),
        FailureKind.MODEL_NOT_FOUND,
    ),
    (
        400,
        _openai("This model's maximum context length is 8192 tokens.", code="context_length_exceeded"),
        FailureKind.CONTEXT_TOO_LONG,
    ),
    (429, _openai("You exceeded your current quota", code="insufficient_quota"), FailureKind.BAD_REQUEST),
    (500, _openai("The server had an error", type="server_error"), FailureKind.SERVER_ERROR),
    # vLLM: the older top-level shape, and the newer nested one
    (
        400,
        _vllm_legacy(
            "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens"
        ),
        FailureKind.CONTEXT_TOO_LONG,
    ),
    (
        404,
        _openai("The model `big-model` does not exist.", type="NotFoundError", code=404),
        FailureKind.MODEL_NOT_FOUND,
    ),
    # DeepSeek
    (400, _openai("Model Not Exist", type="invalid_request_error"), FailureKind.MODEL_NOT_FOUND),
    # llama.cpp server
    (
        400,
        _openai(
            "the request exceeds the available context size, try increasing it",
            type="exceed_context_size_error",
            code=400,
        ),
        FailureKind.CONTEXT_TOO_LONG,
    ),
    # TGI
    (
        422,
        {
            "error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. "
            "Given: 4000 `inputs` tokens and 512 `max_new_tokens`",
            "error_type": "validation",
        },
        FailureKind.CONTEXT_TOO_LONG,
    ),
    # SGLang
    (
        400,
        _vllm_legacy("The input (5000 tokens) is longer than the model's context length (4096 tokens)."),
        FailureKind.CONTEXT_TOO_LONG,
    ),
    # Anything else a server refuses
    (400, _openai("Invalid value for 'temperature'", param="temperature"), FailureKind.BAD_REQUEST),
    (405, "Method Not Allowed", FailureKind.BAD_REQUEST),
    (408, "", FailureKind.TIMEOUT),
    (503, "upstream connect error", FailureKind.SERVER_ERROR),
]


@pytest.mark.parametrize(("status", "body", "kind"), ERROR_BODIES)
def test_error_bodies_of_each_server_map_to_a_kind(status: int, body: dict | str, kind: FailureKind):
    assert _error(status, body).kind is kind


def test_error_messages_quote_the_server_but_never_on_401():
    refused = _error(400, {"error": {"message": "Invalid value for 'temperature': 3"}})
    assert "Invalid value for 'temperature': 3" in refused.message
    unauthenticated = _error(401, {"error": {"message": "Incorrect API key provided: sk-abc123"}})
    assert "sk-abc123" not in unauthenticated.message
    assert "apiKeySecret" in unauthenticated.message
    assert "'big-model'" in _error(404, {"detail": "Not Found"}).message


def test_retry_after_comes_from_any_header_servers_use():
    assert _error(429, "", {"Retry-After": "2"}).retry_after == 2
    assert _error(429, "", {"retry-after-ms": "1500", "Retry-After": "2"}).retry_after == 1.5
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < _error(429, "", {"Retry-After": later}).retry_after <= 30
    openai_headers = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m6.5s",
        "x-ratelimit-remaining-tokens": "1000",
        "x-ratelimit-reset-tokens": "20ms",
    }
    assert _error(429, "", openai_headers).retry_after == pytest.approx(66.5)
    assert _error(503, "", {"Retry-After": "4"}).retry_after == 4
    assert _error(429, "", {}).retry_after is None
    assert _error(429, "", {"Retry-After": "soon"}).retry_after is None


def test_a_server_cannot_ask_for_a_wait_longer_than_the_cap():
    cap = openai_wire.MAX_RETRY_AFTER_SECONDS
    assert _error(429, "", {"Retry-After": "86400"}).retry_after == cap
    assert _error(429, "", {"retry-after-ms": "1e12"}).retry_after == cap
    next_week = format_datetime(datetime.now(UTC) + timedelta(days=7), usegmt=True)
    assert _error(503, "", {"Retry-After": next_week}).retry_after == cap
    daily = {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "23h59m0s"}
    assert _error(429, "", daily).retry_after == cap
    assert _error(429, "", {"Retry-After": f"{cap - 1:g}"}).retry_after == cap - 1


def test_the_response_limit_grows_with_the_logprobs_a_call_asks_for():
    small = make_call("http://x/v1", max_tokens=64, top_logprobs=20)
    assert openai_wire.response_byte_limit(small) == openai_wire.MIN_RESPONSE_BYTES
    large = make_call("http://x/v1", max_tokens=8192, top_logprobs=256)
    assert openai_wire.response_byte_limit(large) == 8192 * 257 * openai_wire.LOGPROB_ENTRY_BYTES


# --- the backend against a real server ------------------------------------------------------------


def test_construction_refuses_what_cannot_work():
    with pytest.raises(ValueError, match="tokenizer"):
        OpenAICompatibleBackend("http://teacher:8000/v1", None, token_ids="tokenizer")
    with pytest.raises(ValueError, match="http"):
        OpenAICompatibleBackend("teacher:8000/v1", None)


async def test_answer_with_token_ids_from_the_server(fake_openai):
    backend = OpenAICompatibleBackend(fake_openai.base_url, None)
    try:
        answer = await backend.answer(make_call(fake_openai.base_url, max_tokens=12, top_logprobs=5))
        again = await backend.answer(make_call(fake_openai.base_url, max_tokens=12, top_logprobs=5))
    finally:
        await backend.aclose()
    vocab = fake_openai.vocab()
    logprobs = answer.logprobs
    assert answer.finish_reason == "length" and answer.completion_tokens == 12 and answer.prompt_tokens > 0
    assert answer.text == "".join(vocab[token] for token in logprobs.token_ids)
    assert logprobs.topk_ids.shape == (12, 5) and logprobs.topk_ids.dtype == np.int32
    assert (np.diff(logprobs.topk_logprobs, axis=1) <= 0).all()
    # Real probabilities: the top 5 and the tail make up the whole distribution.
    total = np.exp(logprobs.topk_logprobs.astype(np.float64)).sum(axis=1) + np.exp(logprobs.tail_logprob)
    np.testing.assert_allclose(total, 1.0, rtol=1e-4)
    assert again.text == answer.text
    np.testing.assert_array_equal(again.logprobs.topk_ids, logprobs.topk_ids)
    assert fake_openai.calls()["completions"] == 2


async def test_answer_with_token_ids_from_a_tokenizer_matches_the_server_ids(fake_openai):
    ids = {token: i for i, token in enumerate(fake_openai.vocab())}
    fake_openai.control(flavor="openai")  # refuses vLLM's extension, as OpenAI does
    backend = OpenAICompatibleBackend(fake_openai.base_url, None, tokenizer=vocabulary_of(ids))
    try:
        from_tokenizer = await backend.answer(make_call(fake_openai.base_url))
    finally:
        await backend.aclose()
    fake_openai.control(flavor="vllm")
    backend = OpenAICompatibleBackend(fake_openai.base_url, None, token_ids="server")
    try:
        from_server = await backend.answer(make_call(fake_openai.base_url))
    finally:
        await backend.aclose()
    np.testing.assert_array_equal(from_tokenizer.logprobs.token_ids, from_server.logprobs.token_ids)
    np.testing.assert_array_equal(from_tokenizer.logprobs.topk_ids, from_server.logprobs.topk_ids)
    np.testing.assert_array_equal(from_tokenizer.logprobs.tail_logprob, from_server.logprobs.tail_logprob)


async def test_no_logprobs_asked_none_returned(fake_openai):
    backend = OpenAICompatibleBackend(fake_openai.base_url, None)
    try:
        answer = await backend.answer(make_call(fake_openai.base_url, top_logprobs=0, max_tokens=100))
    finally:
        await backend.aclose()
    assert answer.logprobs is None and answer.token_ids is None
    assert answer.finish_reason == "stop" and answer.completion_tokens == 64 and answer.text


async def test_a_long_response_within_the_limit_is_read_whole(fake_openai):
    fake_openai.control(mode="padded", size=3 * 2**20 + 123, times=1)
    backend = OpenAICompatibleBackend(fake_openai.base_url, None)
    try:
        call = make_call(fake_openai.base_url)
        padded, plain = await backend.answer(call), await backend.answer(call)
    finally:
        await backend.aclose()
    assert padded.text == plain.text and padded.completion_tokens == plain.completion_tokens == 16
    assert np.array_equal(padded.token_ids, plain.token_ids)


@pytest.mark.parametrize(
    ("size", "says"), [(None, "sent more than"), (2**30, "announced 1,073,741,824 bytes")]
)
async def test_a_response_over_the_limit_is_refused_without_reading_it_whole(fake_openai, size, says):
    fake_openai.control(mode="padded", size=size, times=1)
    call = make_call(fake_openai.base_url)
    limit = openai_wire.response_byte_limit(call)

    error = await _failure(fake_openai.base_url, call)

    assert error.kind is FailureKind.MALFORMED_RESPONSE and not error.retryable
    assert says in error.message
    assert (
        f"over the limit of {limit:,} bytes for an answer of max_tokens 16 with top_logprobs 5"
        in error.message
    )


async def _failure(
    base_url: str, call: TeacherCall, api_key: str | None = None, **options
) -> TeacherCallError:
    backend = OpenAICompatibleBackend(base_url, api_key, **options)
    try:
        with pytest.raises(TeacherCallError) as error:
            await backend.answer(call)
    finally:
        await backend.aclose()
    return error.value


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_unreachable_servers_name_the_base_url():
    base_url = f"http://127.0.0.1:{_closed_port()}/v1"
    error = await _failure(base_url, make_call(base_url))
    assert error.kind is FailureKind.UNREACHABLE and base_url in error.message and error.retryable
    unknown_host = "http://teacher.invalid/v1"
    error = await _failure(unknown_host, make_call(unknown_host))
    assert error.kind is FailureKind.UNREACHABLE and unknown_host in error.message


async def test_a_base_url_that_is_not_the_api_root_says_so(fake_openai):
    wrong = fake_openai.root  # no /v1: the server answers 404 Not Found
    error = await _failure(wrong, make_call(wrong))
    assert error.kind is FailureKind.MODEL_NOT_FOUND and "base_url" in error.message


@pytest.mark.parametrize("flavor", ["vllm", "openai"])
async def test_wrong_or_missing_api_key_is_unauthenticated_and_the_key_never_shows(
    fake_openai, flavor, caplog
):
    fake_openai.control(api_key="sk-the-right-one", flavor=flavor)
    call = make_call(fake_openai.base_url, top_logprobs=0)
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as structured:
        wrong = await _failure(fake_openai.base_url, call, API_KEY, tokenizer=NO_TOKENS)
        missing = await _failure(fake_openai.base_url, call, None, tokenizer=NO_TOKENS)
    for error in (wrong, missing):
        assert error.kind is FailureKind.UNAUTHENTICATED and not error.retryable
        assert "apiKeySecret" in error.message
        assert API_KEY not in str(error) and API_KEY not in repr(error)
    assert API_KEY not in caplog.text and API_KEY not in repr(structured)
    backend = OpenAICompatibleBackend(fake_openai.base_url, API_KEY)
    assert API_KEY not in repr(backend)
    await backend.aclose()
    # The right key gets answers.
    backend = OpenAICompatibleBackend(fake_openai.base_url, "sk-the-right-one", tokenizer=NO_TOKENS)
    try:
        assert (await backend.answer(call)).text
    finally:
        await backend.aclose()


@pytest.mark.parametrize("flavor", ["vllm", "openai"])
async def test_unknown_model_names_the_model(fake_openai, flavor):
    fake_openai.control(flavor=flavor)
    call = make_call(fake_openai.base_url, model="no-such-model", top_logprobs=0)
    error = await _failure(fake_openai.base_url, call, tokenizer=NO_TOKENS)
    assert error.kind is FailureKind.MODEL_NOT_FOUND and "'no-such-model'" in error.message


@pytest.mark.parametrize("flavor", ["vllm", "openai"])
async def test_prompt_longer_than_the_context(fake_openai, flavor):
    fake_openai.control(flavor=flavor, max_prompt_chars=1000)
    call = make_call(fake_openai.base_url, prompt="word " * 400, top_logprobs=0)
    error = await _failure(fake_openai.base_url, call, tokenizer=NO_TOKENS)
    assert error.kind is FailureKind.CONTEXT_TOO_LONG and "maximum context length" in error.message


async def test_other_refusals_quote_the_server(fake_openai):
    error = await _failure(fake_openai.base_url, make_call(fake_openai.base_url, top_logprobs=25))
    assert error.kind is FailureKind.BAD_REQUEST and "Expected a value <= 20" in error.message
    fake_openai.control(flavor="openai")
    error = await _failure(fake_openai.base_url, make_call(fake_openai.base_url), token_ids="server")
    assert error.kind is FailureKind.BAD_REQUEST and "return_tokens_as_token_ids" in error.message


@pytest.mark.parametrize(
    ("mode", "kind", "says"),
    [
        ("garbage", FailureKind.MALFORMED_RESPONSE, "not JSON"),
        ("missing_fields", FailureKind.MALFORMED_RESPONSE, "choices"),
        ("no_logprobs", FailureKind.MISSING_LOGPROBS, "top_logprobs=5"),
    ],
)
async def test_answers_that_are_not_answers(fake_openai, mode, kind, says):
    fake_openai.control(mode=mode)
    error = await _failure(fake_openai.base_url, make_call(fake_openai.base_url))
    assert error.kind is kind and says in error.message and not error.retryable


async def test_rate_limits_server_errors_and_timeouts_are_retryable(fake_openai):
    call = make_call(fake_openai.base_url)
    fake_openai.control(mode="429", retry_after=3, times=1)
    error = await _failure(fake_openai.base_url, call)
    assert error.kind is FailureKind.RATE_LIMITED and error.retry_after == 3 and error.retryable
    fake_openai.control(mode="500", status=502, times=1)
    error = await _failure(fake_openai.base_url, call)
    assert error.kind is FailureKind.SERVER_ERROR and "502" in error.message and error.retryable
    fake_openai.control(mode="slow", delay=1, times=1)
    error = await _failure(fake_openai.base_url, call, timeout_seconds=0.3)
    assert error.kind is FailureKind.TIMEOUT and error.retryable
    calls = fake_openai.calls()
    assert calls["completions"] == 3 and calls["by_status"] == {"429": 1, "502": 1}


@pytest.mark.parametrize(
    "tokens",
    [
        ["token_id:1", "Hello"],
        ["token_id:1,token_id:2"],
        ["token_id:1token_id:", "2"],
        ["token_id:-1"],
        ["token_id:"],
    ],
)
def test_token_ids_from_the_server_must_each_be_one_id(tokens: list[str]):
    with pytest.raises(TeacherCallError) as error:
        token_ids_from_server(tokens)
    assert error.value.kind is FailureKind.MALFORMED_RESPONSE
    assert token_ids_from_server(["token_id:5", "token_id:0"]).tolist() == [5, 0]


def test_server_specific_fields_go_into_the_request_but_never_replace_stillhouses_own():
    from stillhouse.teacher.backends.openai_wire import chat_request

    extra = (("repeat_penalty", 1.0), ("temperature", 2.0), ("top_k", 40))
    body = chat_request(make_call("http://x/v1", extra_body=extra), token_ids_from_server=False)
    assert body["repeat_penalty"] == 1.0 and body["top_k"] == 40
    assert body["temperature"] == 0.7
    plain = make_call("http://x/v1")
    assert make_call("http://x/v1", extra_body=(("top_k", 40),)).cache_key() != plain.cache_key()
