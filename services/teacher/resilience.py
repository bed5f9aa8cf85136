"""Ask the teacher as fast as it allows and no faster: bounded concurrency, request and token budgets,
retries with backoff, and a circuit breaker, around any `TeacherBackend`.

One `answer` is: retry (tenacity) of one attempt, where an attempt is
    circuit breaker (purgatory) > requests-per-minute budget > tokens-per-minute budget
    > concurrency slot > the backend's answer within `timeout_seconds`.
Each attempt pays the budgets again, since the server counts every request it sees.

The budgets are `limits` sliding-window counters kept in `limiter_storage_uri`: in memory they bind
one process; in Redis (``redis://host:6379``) every replica that uses the same `key` (base URL and
model, say) draws on one budget, which is how a teacher's account-wide limits hold across replicas.
The concurrency bound and the circuit breaker are per process.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import redis.asyncio
import structlog
from limits import RateLimitItemPerSecond
from limits.aio.storage import RedisStorage, Storage
from limits.aio.strategies import RateLimiter, SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from stillhouse.common.jobspec import TeacherLimits
from stillhouse.teacher.backends.base import TeacherBackend
from stillhouse.teacher.calls import FailureKind, TeacherAnswer, TeacherCall, TeacherCallError

log = structlog.get_logger(__name__)

# Failures that say the teacher itself is down, as opposed to this call being wrong or too many.
OUTAGE = frozenset({FailureKind.UNREACHABLE, FailureKind.SERVER_ERROR, FailureKind.TIMEOUT})

_NAMESPACE = "stillhouse-teacher"


class ResilientTeacher:
    def __init__(
        self,
        backend: TeacherBackend,
        limits: TeacherLimits,
        *,
        key: str,
        limiter_storage_uri: str = "memory://",
        rate_window_seconds: int = 60,
        breaker_threshold: int = 5,
        breaker_cooldown_seconds: float = 30.0,
        backoff_initial_seconds: float = 1.0,
        backoff_max_seconds: float = 60.0,
    ) -> None:
        """`key` names the budgets to share (replicas with the same key and storage share them).
        Per-minute limits are enforced as `rate_window_seconds`-long sliding windows holding the
        per-minute amount scaled to the window (at least 1). The breaker opens after
        `breaker_threshold` outages in a row and lets calls through again after the cool-down."""
        if rate_window_seconds < 1:
            raise ValueError(f"rate_window_seconds must be a whole number >= 1; got {rate_window_seconds}")
        self.backend = backend
        self.limits = limits
        self.key = key
        self._semaphore = asyncio.Semaphore(limits.max_concurrency)
        self._storage, self._redis_pool = _limiter_storage(limiter_storage_uri)
        limiter = SlidingWindowCounterRateLimiter(self._storage)
        self._requests = (
            _Budget(limiter, limits.requests_per_minute, rate_window_seconds, key, "requests")
            if limits.requests_per_minute
            else None
        )
        self._tokens = (
            _Budget(limiter, limits.tokens_per_minute, rate_window_seconds, key, "tokens")
            if limits.tokens_per_minute
            else None
        )
        self._breakers = AsyncCircuitBreakerFactory(
            default_threshold=breaker_threshold,
            default_ttl=breaker_cooldown_seconds,
            # Only outages count against the teacher; any other outcome counts as it answering.
            exclude=[(BaseException, lambda error: not _is_outage(error))],
        )
        self._breakers.add_listener(self._log_breaker_event)
        self._backoff = wait_exponential_jitter(
            multiplier=backoff_initial_seconds, max=backoff_max_seconds, jitter=backoff_initial_seconds
        )
        self._retrying = AsyncRetrying(
            stop=stop_after_attempt(limits.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception(lambda error: isinstance(error, TeacherCallError) and error.retryable),
            before_sleep=self._log_retry,
            reraise=True,
        )

    async def answer(self, call: TeacherCall, estimated_tokens: int) -> TeacherAnswer:
        """The teacher's answer, after as many attempts as `max_retries` allows. `estimated_tokens`
        (prompt plus max_tokens) is what each attempt takes from the tokens-per-minute budget.
        Raises the last attempt's `TeacherCallError`, or CIRCUIT_OPEN while the breaker is open."""
        return await self._retrying.copy()(self._attempt, call, estimated_tokens)

    async def aclose(self) -> None:
        await self.backend.aclose()
        if self._redis_pool is not None:
            await self._redis_pool.aclose()

    async def _attempt(self, call: TeacherCall, estimated_tokens: int) -> TeacherAnswer:
        breaker = await self._breakers.get_breaker(self.key)
        try:
            async with breaker:
                if self._requests is not None:
                    await self._requests.take(1)
                if self._tokens is not None:
                    await self._tokens.take(estimated_tokens)
                async with self._semaphore:
                    try:
                        async with asyncio.timeout(self.limits.timeout_seconds):
                            return await self.backend.answer(call)
                    except TimeoutError:
                        raise TeacherCallError(
                            FailureKind.TIMEOUT,
                            f"no answer from model {call.model!r} within {self.limits.timeout_seconds:g} s",
                        ) from None
        except OpenedState as opened:
            cooldown_left = max(opened.opened_at + self._breakers.default_ttl - time.time(), 0.0)
            raise TeacherCallError(
                FailureKind.CIRCUIT_OPEN,
                f"the teacher {self.key} failed {self._breakers.default_threshold} times in a row; "
                f"not calling it for another {cooldown_left:.0f} s",
                retry_after=cooldown_left,
            ) from None

    def _wait(self, retry_state: RetryCallState) -> float:
        """Exponential backoff with jitter, or longer when the server said how long to wait."""
        backoff = self._backoff(retry_state)
        error = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = error.retry_after if isinstance(error, TeacherCallError) else None
        return max(backoff, retry_after or 0.0)

    def _log_retry(self, retry_state: RetryCallState) -> None:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        log.warning(
            "teacher call failed; retrying",
            teacher=self.key,
            attempt=retry_state.attempt_number,
            wait_seconds=round(retry_state.upcoming_sleep, 3),
            kind=error.kind.value if isinstance(error, TeacherCallError) else type(error).__name__,
            error=error.message if isinstance(error, TeacherCallError) else str(error),
        )

    def _log_breaker_event(self, name: str, event_type: str, event: Any) -> None:
        if event_type == "state_changed":
            log.warning("teacher circuit breaker changed state", teacher=name, state=event.state)


def _is_outage(error: BaseException) -> bool:
    return isinstance(error, TeacherCallError) and error.kind in OUTAGE


class _Budget:
    """A per-minute budget (requests or tokens) as a `limits` sliding window; `take` waits its turn."""

    def __init__(
        self,
        limiter: RateLimiter,
        per_minute: int,
        window_seconds: int,
        key: str,
        unit: str,
    ) -> None:
        self._limiter = limiter
        amount = max(1, round(per_minute * window_seconds / 60))
        self._item = RateLimitItemPerSecond(amount, window_seconds, namespace=_NAMESPACE)
        self._identifiers = (key, unit)
        # Callers of one process queue here in turn, so that only the first checks the shared window.
        self._turn = asyncio.Lock()

    async def take(self, cost: int) -> None:
        """Wait until `cost` fits in the window, then take it. A cost larger than the whole window
        takes the whole window, so that it waits for an empty window instead of forever."""
        amount, window = self._item.amount, self._item.get_expiry()
        cost = min(max(cost, 1), amount)
        # Sleep at least as long as the budget takes to refill `cost` at its steady rate, so the
        # window is checked at the pace it frees up rather than spun on.
        refill_seconds = cost * window / amount
        async with self._turn:
            while not await self._limiter.hit(self._item, *self._identifiers, cost=cost):
                stats = await self._limiter.get_window_stats(self._item, *self._identifiers)
                pause = max(stats.reset_time - time.time(), refill_seconds)
                await asyncio.sleep(pause * random.uniform(1.0, 1.1))


def _limiter_storage(uri: str) -> tuple[Storage, redis.asyncio.ConnectionPool | None]:
    """The `limits` async storage for `uri` ("memory://", "redis://host:port/db", or the same with
    `limits`' "async+" prefix), and the Redis connection pool to close with it."""
    plain = uri.removeprefix("async+")
    if plain.startswith(("redis://", "rediss://")):
        pool = redis.asyncio.ConnectionPool.from_url(plain)
        storage = RedisStorage(f"async+{plain}", implementation="redispy", connection_pool=pool)
        return storage, pool
    return storage_from_string(f"async+{plain}"), None
