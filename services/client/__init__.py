"""The Python SDK of the Stillhouse jobs API.

    from stillhouse.client import Client

    with Client() as client:  # the API of `stillhouse up`, or STILLHOUSE_API_URL / STILLHOUSE_API_TOKEN
        job = client.submit(Path("job.yaml"))
        done = client.wait(job.id, on_progress=print)
        client.pull(job.id, "student")

`AsyncClient` offers the same methods for asyncio. Every failure is a `StillhouseError`.
"""

from stillhouse.client.async_client import AsyncClient
from stillhouse.client.endpoint import ApiEndpoint
from stillhouse.client.errors import (
    ApiUnavailable,
    Conflict,
    DownloadError,
    EndpointNotFound,
    Forbidden,
    InvalidRequest,
    InvalidSpec,
    NotFound,
    QuotaExceeded,
    StillhouseError,
    Unauthorized,
    WaitTimeout,
)
from stillhouse.client.events import ErrorEvent, JobEvent, PhaseEvent, ProgressEvent
from stillhouse.client.sync_client import Client
from stillhouse.common.api_models import (
    AnswerSample,
    ArtifactFileLink,
    ArtifactLinks,
    ArtifactName,
    EstimateView,
    EvaluationSummary,
    FieldError,
    JobList,
    JobSummary,
    JobView,
    SpecValidation,
    StepView,
)
from stillhouse.common.job_phases import TERMINAL_PHASES, Phase, Stage, StepState
from stillhouse.common.jobspec import DistillationJob

__all__ = [
    "TERMINAL_PHASES",
    "AnswerSample",
    "ApiEndpoint",
    "ApiUnavailable",
    "ArtifactFileLink",
    "ArtifactLinks",
    "ArtifactName",
    "AsyncClient",
    "Client",
    "Conflict",
    "DistillationJob",
    "DownloadError",
    "EndpointNotFound",
    "ErrorEvent",
    "EstimateView",
    "EvaluationSummary",
    "FieldError",
    "Forbidden",
    "InvalidRequest",
    "InvalidSpec",
    "JobEvent",
    "JobList",
    "JobSummary",
    "JobView",
    "NotFound",
    "Phase",
    "PhaseEvent",
    "ProgressEvent",
    "QuotaExceeded",
    "SpecValidation",
    "Stage",
    "StepState",
    "StepView",
    "StillhouseError",
    "Unauthorized",
    "WaitTimeout",
]
