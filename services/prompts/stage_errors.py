"""Failures of the prompts stage that a user can cause, as the status codes the operation fails with."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from stillhouse.common.datasets.store import DatasetConflict
from stillhouse.common.objectstore.objects import ObjectStoreError
from stillhouse.common.operations import OperationError
from stillhouse.prompts.generation import GenerationError
from stillhouse.prompts.sources import PromptSourceError
from stillhouse.prompts.templates import TemplateError


@contextmanager
def stage_errors() -> Iterator[None]:
    """Raise the failures a user can cause as `OperationError`s (which end the stage, not retried)."""
    try:
        yield
    except PromptSourceError as exc:
        # Only a missing file or object is not the spec's fault.
        code = grpc.StatusCode.FAILED_PRECONDITION if exc.missing else grpc.StatusCode.INVALID_ARGUMENT
        raise OperationError(code, str(exc)) from exc
    except (TemplateError, GenerationError) as exc:
        raise OperationError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
    except DatasetConflict as exc:
        raise OperationError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc
    except ObjectStoreError as exc:
        raise OperationError(grpc.StatusCode.UNAVAILABLE, f"object storage: {exc}") from exc
