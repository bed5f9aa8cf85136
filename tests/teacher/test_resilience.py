"""ResilientTeacher against a real local OpenAI-compatible server: retries that honour Retry-After,
timeouts, the circuit breaker, request and token budgets (shared through Redis), bounded concurrency.

Timings are checked only from below (a budget must have made calls wait at least this long), never
tightly from above, so that a slow machine cannot fail them."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import socket
import time

import pytest
import redis
import structlog

from stillhouse.common.jobspec import TeacherLimits
from stillhouse.teacher.backends.base import TeacherBackend
from stillhouse.teacher.backends.openai_http import OpenAICompatibleBackend
from stillhouse.teacher.calls import ChatMessage, FailureKind, TeacherAnswer, TeacherCall, TeacherCallError
from stillhouse.teacher.resilience import ResilientTeacher

REDIS_URL = os.environ.get("STILLHOUSE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def make_call(base_url: str, prompt: str = "Say hello.") -> TeacherCall:
    return TeacherCall(
        backend="openai",
        base_url=base_url,
        model="fake-teacher",
        revision="",
        messages=(ChatMessage("user", prompt),),
        temperature=0.0,
        top_p=1.0,
        max_tokens=8,
        seed=None,
        top_logprobs=3,
    )


def limits(**values: object) -> TeacherLimits:
    return TeacherLimits.model_validate({"maxRetries": 3, "timeoutSeconds": 10, **values})


def teacher(base_url: str, teacher_limits: TeacherLimits, **options: object) -> ResilientTeacher:
    backend = OpenAICompatibleBackend(base_url, None, max_connections=teacher_limits.max_concurrency)
    options = {
        "key": f"{base_url} fake-teacher {secrets.token_hex(4)}",
        "backoff_initial_seconds": 0.01,
        **options,
    }
    return ResilientTeacher(backend, teacher_limits, **options)


async def ask(resilient: ResilientTeacher, prompt: str, estimated_tokens: int = 20) -> TeacherAnswer:
    return await resilient.answer(make_call(resilient.backend.base_url, prompt), estimated_tokens)


class CountingBackend(TeacherBackend):
    """Counts the attempts that reach the backend it wraps."""

    def __init__(self, inner: TeacherBackend) -> None:
        self.inner = inner
        self.attempts = 0

    async def answer(self, call: TeacherCall) -> TeacherAnswer:
        self.attempts += 1
        return await self.inner.answer(call)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_429_waits_as_long_as_retry_after_says(fake_openai):
    fake_openai.control(mode="429", retry_after=1, times=1)
    resilient = teacher(fake_openai.base_url, limits())
    try:
        started = time.monotonic()
        answer = await ask(resilient, "Say hello.")
        waited = time.monotonic() - started
    finally:
        await resilient.aclose()
    assert answer.text and answer.logprobs is not None
    assert waited >= 1.0, "the retry came before Retry-After allowed"
    assert fake_openai.calls()["by_status"] == {"429": 1, "200": 1}


async def test_server_errors_are_retried_until_an_answer(fake_openai):
    fake_openai.control(mode="500", times=2)
    resilient = teacher(fake_openai.base_url, limits())
    try:
        answer = await ask(resilient, "retry me")
    finally:
        await resilient.aclose()
    assert answer.text
    calls = fake_openai.calls()
    assert calls["by_prompt"] == {"retry me": 3} and calls["by_status"] == {"500": 2, "200": 1}


async def test_retries_stop_after_max_retries_and_wrong_calls_are_not_retried(fake_openai):
    fake_openai.control(mode="500")
    resilient = teacher(fake_openai.base_url, limits(maxRetries=2), breaker_threshold=100)
    try:
        with pytest.raises(TeacherCallError) as error:
            await ask(resilient, "always fails")
        assert error.value.kind is FailureKind.SERVER_ERROR
        assert fake_openai.calls()["by_prompt"] == {"always fails": 3}
        fake_openai.reset()
        call = make_call(fake_openai.base_url, "no such model")
        with pytest.raises(TeacherCallError) as error:
            await resilient.answer(dataclasses.replace(call, model="missing"), estimated_tokens=20)
        assert error.value.kind is FailureKind.MODEL_NOT_FOUND
        assert fake_openai.calls()["completions"] == 1
    finally:
        await resilient.aclose()


async def test_a_slow_answer_times_out_and_the_retry_gets_one(fake_openai):
    fake_openai.control(mode="slow", delay=3, times=1)
    resilient = teacher(fake_openai.base_url, limits(timeoutSeconds=0.5))
    try:
        answer = await ask(resilient, "slow")
    finally:
        await resilient.aclose()
    assert answer.text
    assert fake_openai.calls()["by_prompt"] == {"slow": 2}


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_circuit_opens_on_an_unreachable_teacher_and_fails_fast():
    base_url = f"http://127.0.0.1:{_closed_port()}/v1"
    backend = CountingBackend(OpenAICompatibleBackend(base_url, None))
    resilient = ResilientTeacher(
        backend,
        limits(maxRetries=10),
        key=f"{base_url} {secrets.token_hex(4)}",
        breaker_threshold=3,
        breaker_cooldown_seconds=30,
        backoff_initial_seconds=0.01,
    )
    try:
        with pytest.raises(TeacherCallError) as error:
            await resilient.answer(make_call(base_url), estimated_tokens=20)
        # Three unreachable attempts open the circuit; the fourth is refused without being made.
        assert error.value.kind is FailureKind.CIRCUIT_OPEN and backend.attempts == 3
        assert 0 < error.value.retry_after <= 30
        started = time.monotonic()
        for _ in range(20):
            with pytest.raises(TeacherCallError) as error:
                await resilient.answer(make_call(base_url), estimated_tokens=20)
            assert error.value.kind is FailureKind.CIRCUIT_OPEN and not error.value.retryable
        assert time.monotonic() - started < 5, "an open circuit should fail at once"
        assert backend.attempts == 3, "no call may reach the teacher while the circuit is open"
    finally:
        await resilient.aclose()


async def test_circuit_half_opens_after_the_cooldown_and_closes_on_an_answer(fake_openai):
    fake_openai.control(mode="500", times=2)
    resilient = teacher(
        fake_openai.base_url, limits(maxRetries=5), breaker_threshold=2, breaker_cooldown_seconds=1
    )
    try:
        with pytest.raises(TeacherCallError) as error:
            await ask(resilient, "Say hello.")
        assert error.value.kind is FailureKind.CIRCUIT_OPEN
        assert fake_openai.calls()["completions"] == 2
        await asyncio.sleep(1.1)
        # The server is well again: the trial call gets through and closes the circuit.
        assert (await ask(resilient, "Say hello.")).text
        assert (await ask(resilient, "again")).text
        assert fake_openai.calls()["completions"] == 4
    finally:
        await resilient.aclose()


# A sliding window never holds more than its budget, so calls worth B budgets touch at least B
# windows: they span more than B - 2 whole windows, however the first one is placed.


async def test_requests_per_minute_make_calls_wait(fake_openai):
    # 120 a minute over 1-second windows: 2 a window; 8 calls span more than 2 windows.
    resilient = teacher(fake_openai.base_url, limits(requestsPerMinute=120), rate_window_seconds=1)
    try:
        started = time.monotonic()
        answers = await asyncio.gather(*(ask(resilient, f"p{i}", 1) for i in range(8)))
        elapsed = time.monotonic() - started
    finally:
        await resilient.aclose()
    assert len(answers) == 8 and fake_openai.calls()["completions"] == 8
    assert elapsed >= 1.9


async def test_tokens_per_minute_make_calls_wait_and_an_oversized_call_still_runs(fake_openai):
    # 600 tokens a minute over 1-second windows: 10 a window; 8 calls of 3 tokens span more than 1.
    resilient = teacher(fake_openai.base_url, limits(tokensPerMinute=600), rate_window_seconds=1)
    try:
        started = time.monotonic()
        await asyncio.gather(*(ask(resilient, f"t{i}", 3) for i in range(8)))
        assert time.monotonic() - started >= 0.9
        # More tokens than a whole window holds: it waits for an empty window instead of forever.
        assert (await ask(resilient, "huge", 10_000)).text
    finally:
        await resilient.aclose()


@pytest.fixture
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as error:
        pytest.fail(
            f"Redis is not reachable at {REDIS_URL} ({error}); start it or set STILLHOUSE_TEST_REDIS_URL"
        )
    return REDIS_URL


async def test_replicas_sharing_redis_share_one_budget(fake_openai, redis_url):
    # 90 a minute over 2-second windows: 3 per window, for both replicas together.
    key = f"{fake_openai.base_url} fake-teacher {secrets.token_hex(8)}"
    replicas = [
        teacher(
            fake_openai.base_url,
            limits(requestsPerMinute=90),
            key=key,
            limiter_storage_uri=redis_url,
            rate_window_seconds=2,
        )
        for _ in range(2)
    ]
    try:
        calls = [
            asyncio.create_task(ask(replica, f"r{n}-{i}", 1))
            for n, replica in enumerate(replicas)
            for i in range(2)
        ]
        await asyncio.sleep(0.6)
        # Each replica alone would have let both its calls through; together only 3 fit the window.
        assert fake_openai.calls()["completions"] == 3
        assert sum(call.done() for call in calls) == 3
        await asyncio.wait_for(asyncio.gather(*calls), timeout=15)
        assert fake_openai.calls()["completions"] == 4
    finally:
        for replica in replicas:
            await replica.aclose()


async def test_concurrency_never_exceeds_max_concurrency(fake_openai):
    fake_openai.control(mode="slow", delay=0.2)
    resilient = teacher(fake_openai.base_url, limits(maxConcurrency=3))
    try:
        await asyncio.gather(*(ask(resilient, f"c{i}", 1) for i in range(12)))
    finally:
        await resilient.aclose()
    calls = fake_openai.calls()
    assert calls["completions"] == 12 and calls["max_in_flight"] == 3


async def test_the_api_key_is_in_no_error_and_no_log_line(fake_openai, caplog):
    key = "sk-live-3a9f1c7e52d84b06"
    fake_openai.control(api_key=key)
    fake_openai.control(mode="429", retry_after=0.1, times=1, echo_key=True)
    fake_openai.control(mode="500", times=2, echo_key=True)
    resilient = ResilientTeacher(
        OpenAICompatibleBackend(fake_openai.base_url, key),
        limits(maxRetries=2),
        key=f"{fake_openai.base_url} {secrets.token_hex(4)}",
        backoff_initial_seconds=0.01,
    )
    caplog.set_level(logging.DEBUG)
    try:
        with structlog.testing.capture_logs() as structured, pytest.raises(TeacherCallError) as error:
            await ask(resilient, "leaky")
    finally:
        await resilient.aclose()
    # The server put the key in every message; none of it came through.
    assert error.value.kind is FailureKind.SERVER_ERROR and "<api key>" in error.value.message
    retries = [line for line in structured if line["event"] == "teacher call failed; retrying"]
    assert [line["kind"] for line in retries] == ["rate_limited", "server_error"]
    assert key not in str(error.value) and key not in repr(structured) and key not in caplog.text
    assert fake_openai.calls()["by_prompt"] == {"leaky": 3}
