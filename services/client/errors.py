"""What the SDK raises: one base class, and one subclass per kind of failure a caller handles differently.

An error from an API answer keeps the API's own words (`message`) and the HTTP status; `str(error)` is a
sentence meant to be shown to a person as it is.
"""

from __future__ import annotations

from stillhouse.common.api_models import FieldError


class StillhouseError(Exception):
    """Any failure of a Stillhouse API call. `status` is the HTTP status where the API answered."""

    status: int | None = None

    def __init__(self, message: str, *, status: int | None = None, text: str | None = None) -> None:
        """`message`: the API's own words where it answered; `text`: the sentence to show, if not those."""
        super().__init__(text or message)
        self.message = message
        if status is not None:
            self.status = status


class EndpointNotFound(StillhouseError):
    """No API URL or token was given or could be found (`stillhouse up`'s endpoint file, environment)."""


class ApiUnavailable(StillhouseError):
    """Nothing answered at the API's URL, the answer took too long, or the API failed (5xx)."""


class Unauthorized(StillhouseError):
    """401: the API refused the token."""

    status = 401


class Forbidden(StillhouseError):
    """403: the token is valid but may not do this."""

    status = 403


class NotFound(StillhouseError):
    """404: no such job (`job_id` names it) or artifact, or the route does not exist on this API."""

    status = 404

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


class Conflict(StillhouseError):
    """409: the job is in a state that does not allow this, e.g. cancelling a job that has ended."""

    status = 409


class InvalidRequest(StillhouseError):
    """422: the request (usually the job spec) failed validation; `errors` names each bad field, with the
    line of the submitted document where the API knows it."""

    status = 422

    def __init__(self, message: str, errors: list[FieldError]) -> None:
        super().__init__(message)
        self.errors = errors

    def lines(self) -> list[str]:
        """One `field: message` line per error (the message alone when there are none)."""
        return [f"{e.field}: {e.message}" if e.field else e.message for e in self.errors] or [self.message]


# The usual name when what failed is a job spec.
InvalidSpec = InvalidRequest


class QuotaExceeded(StillhouseError):
    """429: the tenant's quota (jobs in flight, submissions per hour, ...) does not allow this now."""

    status = 429


class WaitTimeout(StillhouseError):
    """`wait` gave up before the job reached a terminal phase; the job itself goes on."""

    def __init__(self, job_id: str, seconds: float, phase: str | None) -> None:
        where = f" (last phase seen: {phase})" if phase else ""
        super().__init__(f"job {job_id} did not finish within {seconds:g} s{where}")
        self.job_id = job_id
        self.phase = phase


class DownloadError(StillhouseError):
    """An artifact file could not be fetched or does not match its manifest; the message names it."""
