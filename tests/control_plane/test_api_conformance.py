"""The REST API against its own OpenAPI schema: schemathesis generates requests for every operation from
the published schema, valid and invalid, and checks each answer: no server error, a documented status
code and content type, headers and a body that match the schema, invalid requests refused and valid
ones accepted."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

pytestmark = pytest.mark.long

MAX_EXAMPLES = 20
UNPARSEABLE_HTTP = "Invalid HTTP request received."  # uvicorn's answer to a request it cannot parse
NEGATIVE_DATA_REJECTED = ["400", "401", "403", "404", "405", "406", "409", "415", "422", "428", "429"]
VALID_DATA_ACCEPTED = ["2xx", "401", "403", "404", "409", "429"]

CONFIG = {
    "checks": {
        # The body's cap (1 MiB) is not one a JSON schema can state: a body past it is refused with 413.
        "negative_data_rejection": {"expected-statuses": [*NEGATIVE_DATA_REJECTED, "413"]},
        # A server error is never an acceptable answer to a valid request.
        "positive_data_acceptance": {"expected-statuses": VALID_DATA_ACCEPTED},
    },
    "operations": [
        *(
            {
                # A spec's rules across fields (one way to start the student, a tokenizer for an `openai`
                # teacher with a logit loss, ...) and the submit-time check of the models it names are
                # beyond a JSON schema: a schema-valid spec may still get a 422 naming the field.
                "include-name": f"POST {path}",
                "checks": {"positive_data_acceptance": {"expected-statuses": [*VALID_DATA_ACCEPTED, "422"]}},
            }
            for path in ("/v1/jobs", "/v1/jobs:estimate", "/v1/jobs:validate")
        ),
        *(
            {
                # The three read their body through one dependency (`submitted_job.SubmittedJob`): the
                # coverage phase's invalid bodies, about 2,000 for the job spec's schema, are tried on the
                # submit alone, and the estimate and the validation get its valid ones (and the fuzzing
                # phase's of both kinds). Three times over, they made up 90% of this test's requests.
                "include-name": f"POST {path}",
                "phases": {"coverage": {"generation": {"mode": "positive"}}},
            }
            for path in ("/v1/jobs:estimate", "/v1/jobs:validate")
        ),
        # A stream that never ends by itself has no answer to check (test_console_api follows it).
        {"include-name": "GET /v1/events", "enabled": False},
        *(
            {
                # pageToken is opaque: only a token the API gave out is one; any other string is a 400.
                "include-name": f"GET {path}",
                "checks": {"positive_data_acceptance": {"expected-statuses": [*VALID_DATA_ACCEPTED, "400"]}},
            }
            for path in ("/v1/jobs", "/v1/audit")
        ),
    ],
}


@pytest.fixture
def api(start_api):
    """Every stage scripted, so that an estimate or a job runs through."""
    return start_api(every_stage=True)


@pytest.fixture
def api_schema(api):
    return schemathesis.openapi.from_url(
        f"{api.url}/openapi.json", config=SchemathesisConfig.from_dict(CONFIG)
    )


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_conforms_to_the_published_schema(case, api):
    response = case.call(headers={"Authorization": f"Bearer {api.token}"})
    if response.status_code == 400 and response.text == UNPARSEABLE_HTTP:
        # Generated headers can break HTTP itself (a Content-Length of "56{|/"): the HTTP server refuses
        # such a request before the API sees it, so the API's schema has nothing to say about the answer.
        return
    case.validate_response(response)
