"""What a job id looks like: the ids a submit gives out, and the path segment that names one."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Path
from starlette.convertors import Convertor, register_url_convertor

# The ids `new_job_id` makes, and nothing with ':' so that `/v1/jobs/{id}:cancel` is never read as the
# job `{id}:cancel`.
JOB_ID_REGEX = "[a-z0-9][a-z0-9-]{0,62}"
JobId = Annotated[str, Path(pattern=f"^{JOB_ID_REGEX}$", description="A job id, such as job-1a2b3c4d5e6f.")]


def new_job_id() -> str:
    return f"job-{secrets.token_hex(6)}"


class _JobIdConvertor(Convertor[str]):
    regex = JOB_ID_REGEX

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


# Routes name it as `{job_id:job_id}`.
register_url_convertor("job_id", _JobIdConvertor())
