"""Riding out transient database errors: which errors are worth trying again, and how long to keep at it.

A dropped connection, a PostgreSQL failover or restart, a serialisation conflict or a locked SQLite file
says nothing about the call that met it: the same call a moment later usually succeeds. Everything else
(a constraint, a bad query, a store's own "no such job") would fail the same way again and is raised at
once. A retried call runs from the start, so it must be one transaction (or safe to run twice).
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import structlog
import tenacity
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

log = structlog.get_logger(__name__)

# How long a call keeps trying by default: longer than a PostgreSQL failover or restart usually takes.
DEFAULT_RETRY_SECONDS = 30.0

# PostgreSQL error codes that describe the moment, not the statement.
_TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "53300",  # too_many_connections
        "55P03",  # lock_not_available
        "57P01",  # admin_shutdown: the backend was terminated
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now: the server is starting or shutting down
        "25006",  # read_only_sql_transaction: a former primary, now a standby, after a failover
    }
)
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6  # primary result codes; extended ones carry them in the low byte


class DatabaseUnavailable(Exception):
    """A database call met transient errors until its retry policy ran out; the last one is the cause."""


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` says the database is unavailable for now, rather than that the call is wrong."""
    if isinstance(exc, DatabaseUnavailable):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:  # SQLAlchemy recognised a disconnect
        return True
    error = exc.orig
    sqlstate = getattr(error, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith("08")  # 08: connection exception
    if isinstance(error, sqlite3.Error):
        return getattr(error, "sqlite_errorcode", 0) & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    # A driver error without an SQL state is the driver's own: connecting failed, the socket closed.
    return isinstance(exc, OperationalError | InterfaceError)


def describe(exc: BaseException) -> str:
    """The error in one line, without the SQL statement and its parameters SQLAlchemy adds (the driver's
    message names at most the host, port, user and database, never a password)."""
    error = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


@dataclass(frozen=True)
class RetryPolicy:
    """Try a call again after transient errors, with exponential backoff and jitter, for about
    `max_seconds` in all: no attempt starts after that, though one already running may take longer (an
    SQLite busy timeout or a connection timeout comes on top)."""

    max_seconds: float = DEFAULT_RETRY_SECONDS
    first_wait_seconds: float = 0.1
    max_wait_seconds: float = 5.0

    def retrying(self, what: str) -> tenacity.AsyncRetrying:
        """A tenacity retrier for one call; `what` names the call in logs and in the final error."""

        def log_retry(state: tenacity.RetryCallState) -> None:
            log.warning(
                "database call failed, trying again",
                call=what,
                attempt=state.attempt_number,
                retry_in_seconds=round(state.upcoming_sleep, 3),
                error=describe(_exception(state)),
            )

        def give_up(state: tenacity.RetryCallState) -> Any:
            error = _exception(state)
            attempts = "1 attempt" if state.attempt_number == 1 else f"{state.attempt_number} attempts"
            raise DatabaseUnavailable(
                f"the database stayed unavailable to {what} for {state.seconds_since_start or 0:.1f} s "
                f"({attempts}): {describe(error)}"
            ) from error

        return tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(is_transient),
            wait=tenacity.wait_exponential_jitter(
                multiplier=self.first_wait_seconds, max=self.max_wait_seconds, jitter=self.first_wait_seconds
            ),
            stop=tenacity.stop_before_delay(self.max_seconds),
            before_sleep=log_retry,
            retry_error_callback=give_up,
        )


DEFAULT_RETRY_POLICY = RetryPolicy()


def _exception(state: tenacity.RetryCallState) -> BaseException:
    assert state.outcome is not None
    error = state.outcome.exception()
    assert error is not None
    return error


class HasRetryPolicy(Protocol):
    @property
    def retry_policy(self) -> RetryPolicy: ...


S = TypeVar("S", bound=HasRetryPolicy)
P = ParamSpec("P")
T = TypeVar("T")


def retry_transient(
    method: Callable[Concatenate[S, P], Awaitable[T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """Run an async method under its object's `retry_policy`, each attempt a whole new call."""
    what = method.__qualname__

    @functools.wraps(method)
    async def call(self: S, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.retry_policy.retrying(what)(method, self, *args, **kwargs)

    return call
