"""A job's event stream, typed: the SSE wire format decoded line by line, each event parsed into a
`PhaseEvent`, `ProgressEvent` or `ErrorEvent`, and where to resume after a dropped connection.

Pure logic: the sync and async clients feed it the lines their transport reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from stillhouse.client.errors import ApiUnavailable
from stillhouse.common.api_models import WireModel
from stillhouse.common.job_phases import TERMINAL_PHASES, Phase

# A dropped event stream is reopened (from the last event seen) for this long at most: long enough for
# `stillhouse up` to restart a control plane that crashed.
STREAM_RECONNECT_SECONDS = 120.0


class PhaseEvent(WireModel):
    """The job moved to `phase`; `message` says why where there is something to say."""

    kind: Literal["phase"] = "phase"
    id: str | None = None
    phase: Phase
    message: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES


class ProgressEvent(WireModel):
    """How far the current stage (`prompts`, `teacher`, `train`, `evaluate`) is: `done` of `total` `unit`s;
    training reports its step as `done` and loss, kd, ce, learning_rate, ... in `metrics`."""

    kind: Literal["progress"] = "progress"
    id: str | None = None
    stage: str
    unit: str = ""
    done: int = 0
    total: int | None = None
    message: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)


class ErrorEvent(WireModel):
    """Something went wrong in the job; a `Failed` phase event usually follows."""

    kind: Literal["error"] = "error"
    id: str | None = None
    message: str = ""


JobEvent = PhaseEvent | ProgressEvent | ErrorEvent
_EVENT_TYPES: dict[str, type[PhaseEvent | ProgressEvent | ErrorEvent]] = {
    "phase": PhaseEvent,
    "progress": ProgressEvent,
    "error": ErrorEvent,
}


def parse_event(kind: str, data: str, event_id: str | None) -> JobEvent | None:
    """The typed event; None for an event type this SDK does not know (a newer API may send more)."""
    model = _EVENT_TYPES.get(kind)
    if model is None:
        return None
    fields: dict[str, Any] = json.loads(data) if data else {}
    return model.model_validate({**fields, "kind": kind, "id": event_id})


@dataclass
class SseDecoder:
    """The SSE wire format, one line at a time: `feed` returns (event, data, id) when a blank line ends
    an event with data; comment lines (the API's keep-alive pings) and empty events give None."""

    _kind: str = ""
    _data: list[str] = field(default_factory=list)
    _id: str | None = None

    def feed(self, line: str) -> tuple[str, str, str | None] | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                self._kind = ""
                return None
            event = (self._kind or "message", "\n".join(self._data), self._id)
            self._kind, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._kind = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


@dataclass
class StreamCursor:
    """Where a job's event stream stands across connections: the last event seen (sent back as
    Last-Event-ID) and since when the stream has been lost."""

    job_id: str
    url: str
    last_event_id: str | None = None
    reconnects: int = 0
    lost_since: float | None = None
    # The stream delivered the job's terminal phase: there is nothing more to read.
    ended: bool = False

    def headers(self) -> dict[str, str]:
        return {"Last-Event-ID": self.last_event_id} if self.last_event_id else {}

    @property
    def started(self) -> bool:
        """Whether any connection has delivered an event (a first connection that fails is an error)."""
        return self.last_event_id is not None or self.reconnects > 0

    def seen(self, event: JobEvent) -> None:
        if event.id:
            self.last_event_id = event.id
        self.reconnects, self.lost_since = 0, None

    def receive(self, decoder: SseDecoder, line: str) -> JobEvent | None:
        """The typed event `line` completes, noted as seen; None while an event is still being read."""
        raw = decoder.feed(line)
        event = parse_event(*raw) if raw else None
        if event is not None:
            self.seen(event)
            self.ended = isinstance(event, PhaseEvent) and event.is_terminal
        return event

    def dropped(self, now: float) -> float:
        """The connection broke: how long to wait before reopening it, or ApiUnavailable when it has been
        lost for too long."""
        self.reconnects += 1
        self.lost_since = self.lost_since or now
        if now - self.lost_since > STREAM_RECONNECT_SECONDS:
            raise ApiUnavailable(
                f"lost the event stream of job {self.job_id} at {self.url} for {STREAM_RECONNECT_SECONDS:g} s"
            )
        return min(2.0, 0.2 * 2**self.reconnects)
