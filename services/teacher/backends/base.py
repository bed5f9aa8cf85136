"""What every teacher backend does: answer one call, or say why it could not."""

from __future__ import annotations

from abc import ABC, abstractmethod

from stillhouse.teacher.calls import TeacherAnswer, TeacherCall


class TeacherBackend(ABC):
    """One teacher endpoint. Backends make exactly one attempt per `answer`; retries, rate limits and
    the circuit breaker live in `ResilientTeacher`, so that every backend gets them the same way."""

    @abstractmethod
    async def answer(self, call: TeacherCall) -> TeacherAnswer:
        """The teacher's answer to `call`; raises `TeacherCallError` naming the cause when there is none."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release connections and other resources; the backend answers no more calls."""
