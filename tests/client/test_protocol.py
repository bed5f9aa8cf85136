"""The SDK's pure layer: which error an answer means, the SSE wire format, resuming a stream, and the
body sent for each form of spec."""

from __future__ import annotations

import json

import pytest

from stillhouse.client import (
    ApiUnavailable,
    Conflict,
    DistillationJob,
    Forbidden,
    InvalidSpec,
    NotFound,
    PhaseEvent,
    ProgressEvent,
    QuotaExceeded,
    StillhouseError,
    Unauthorized,
)
from stillhouse.client.events import STREAM_RECONNECT_SECONDS, SseDecoder, StreamCursor, parse_event
from stillhouse.client.protocol import error_for
from stillhouse.client.specs import spec_body

SPEC = {
    "spec": {"teacher": {"backend": "local", "model": "m"}, "student": {"init": {"pruneTeacherDepth": 2}}}
}


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (401, Unauthorized),
        (403, Forbidden),
        (404, NotFound),
        (409, Conflict),
        (422, InvalidSpec),
        (429, QuotaExceeded),
        (503, ApiUnavailable),
        (418, StillhouseError),
    ],
)
def test_each_status_is_its_own_error_with_the_api_message(status: int, error_type: type) -> None:
    error = error_for(status, json.dumps({"message": "the API's words"}).encode(), "Reason")
    assert type(error) is error_type
    assert error.message == "the API's words"
    assert error.status == status
    assert "the API's words" in str(error)


def test_a_422_keeps_field_messages_and_lines() -> None:
    body = {
        "message": "invalid DistillationJob",
        "errors": [
            {
                "field": "spec.training.epochs",
                "message": "Input should be greater than 0",
                "type": "gt",
                "line": 4,
            },
            {"field": "spec.bogus", "message": "Extra inputs are not permitted"},
        ],
    }
    error = error_for(422, json.dumps(body).encode(), "Unprocessable Entity")
    assert isinstance(error, InvalidSpec)
    assert [(e.field, e.line) for e in error.errors] == [("spec.training.epochs", 4), ("spec.bogus", None)]
    assert error.lines() == [
        "spec.training.epochs: Input should be greater than 0",
        "spec.bogus: Extra inputs are not permitted",
    ]


def test_an_answer_that_is_not_json_is_quoted() -> None:
    error = error_for(502, b"<html>Bad Gateway</html>", "Bad Gateway")
    assert isinstance(error, ApiUnavailable)
    assert str(error) == "the API failed (502): <html>Bad Gateway</html>"
    assert error_for(500, b"", "Internal Server Error").message == "Internal Server Error"


def test_the_sse_decoder_skips_pings_and_joins_data_lines() -> None:
    decoder = SseDecoder()
    lines = [": ping", "", "id: 7", "event: progress", 'data: {"stage": "train",', 'data: "done": 3}', ""]
    decoded = [event for line in lines if (event := decoder.feed(line))]
    assert decoded == [("progress", '{"stage": "train",\n"done": 3}', "7")]
    event = parse_event(*decoded[0])
    assert isinstance(event, ProgressEvent)
    assert (event.stage, event.done, event.id, event.metrics) == ("train", 3, "7", {})
    phase = parse_event("phase", '{"phase": "Succeeded", "message": null}', "8")
    assert isinstance(phase, PhaseEvent) and phase.is_terminal
    assert parse_event("something-newer", "{}", "9") is None


def test_a_stream_resumes_after_the_last_event_and_gives_up_in_the_end() -> None:
    cursor = StreamCursor("job-1", "http://api")
    assert cursor.headers() == {} and not cursor.started
    cursor.seen(PhaseEvent(phase="Prompts", id="12"))
    assert cursor.headers() == {"Last-Event-ID": "12"}
    assert 0 < cursor.dropped(100.0) <= 2.0
    assert cursor.dropped(100.0 + STREAM_RECONNECT_SECONDS) <= 2.0
    with pytest.raises(ApiUnavailable, match="lost the event stream of job job-1"):
        cursor.dropped(100.0 + STREAM_RECONNECT_SECONDS + 1)


def test_each_form_of_spec_becomes_a_body() -> None:
    assert spec_body(SPEC) == (json.dumps(SPEC).encode(), "application/json")
    assert spec_body("spec: {}\n") == (b"spec: {}\n", "application/yaml")
    assert spec_body(' {"spec": {}}') == (b' {"spec": {}}', "application/json")
    body, content_type = spec_body(DistillationJob.model_validate(SPEC))
    assert content_type == "application/json"
    assert json.loads(body)["kind"] == "DistillationJob"
    with pytest.raises(TypeError, match=r"pathlib\.Path"):
        spec_body(["not", "a", "spec"])  # type: ignore[arg-type]


def test_a_route_the_api_lacks_is_not_found_in_its_words() -> None:
    error = error_for(404, b'{"detail": "Not Found"}', "Not Found")
    assert isinstance(error, NotFound)
    assert error.message == "Not Found"
