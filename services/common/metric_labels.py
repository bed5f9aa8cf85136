"""Label values that come from users (a teacher's model name) kept to a bounded set, so that a stream of
new values cannot grow a metric's series without end."""

from __future__ import annotations

OTHER = "other"


class BoundedLabelValues:
    """Each value as it is, for the first `limit` distinct values this process sees; every later new
    value is `OTHER`. Values longer than `max_length` characters are cut."""

    def __init__(self, limit: int, max_length: int = 128) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self._limit = limit
        self._max_length = max_length
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        value = value[: self._max_length]
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value
