"""The teachers this service talks to: one resilient client per teacher spec, built on first use and
kept (a local model loads once; an HTTP teacher keeps its connection pool and rate-limit buckets)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import structlog

from stillhouse.common.jobspec import TeacherBackend, TeacherSpec
from stillhouse.common.operations import OperationError
from stillhouse.teacher.backends.base import TeacherBackend as Backend
from stillhouse.teacher.config import TeacherSettings
from stillhouse.teacher.resilience import ResilientTeacher

log = structlog.get_logger(__name__)


def resolve_api_key(secret_name: str | None, api_key_dir: Path | None) -> str | None:
    """The key named by `apiKeySecret`: the mounted Secret file of that name, else that environment
    variable. Errors name where it was looked for, never a value."""
    if secret_name is None:
        return None
    if api_key_dir is not None and (api_key_dir / secret_name).is_file():
        return (api_key_dir / secret_name).read_text().strip()
    if secret_name in os.environ:
        return os.environ[secret_name].strip()
    places = ([f"the file {api_key_dir / secret_name}"] if api_key_dir is not None else []) + [
        f"the environment variable {secret_name}"
    ]
    raise OperationError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"API key secret {secret_name!r} not found: looked in {' and '.join(places)}",
    )


def _teacher_key(spec: TeacherSpec) -> str:
    return "|".join([spec.backend.value, spec.base_url or "", spec.model, spec.api_key_secret or ""])


class TeacherPool:
    def __init__(self, settings: TeacherSettings) -> None:
        self._settings = settings
        self._teachers: dict[tuple[str, str], ResilientTeacher] = {}
        self._lock = asyncio.Lock()

    async def get(self, spec: TeacherSpec) -> ResilientTeacher:
        key = (_teacher_key(spec), spec.limits.model_dump_json())
        async with self._lock:
            if key not in self._teachers:
                backend = await self._backend(spec)
                self._teachers[key] = ResilientTeacher(
                    backend, spec.limits, key=key[0], limiter_storage_uri=self._settings.limiter_storage_uri
                )
                log.info("teacher ready", backend=spec.backend.value, model=spec.model)
            return self._teachers[key]

    async def _backend(self, spec: TeacherSpec) -> Backend:
        if spec.backend is TeacherBackend.LOCAL:
            from stillhouse.teacher.backends.local_hf import LocalHFBackend

            device = None if self._settings.local_device == "auto" else self._settings.local_device
            try:
                return await asyncio.to_thread(
                    LocalHFBackend,
                    spec.model,
                    device=device,
                    max_batch_size=self._settings.local_max_batch_size,
                )
            except (OSError, ValueError) as exc:
                raise OperationError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"cannot load the local teacher {spec.model!r}: {exc}",
                ) from exc
        from stillhouse.teacher.backends.openai_http import OpenAICompatibleBackend

        tokenizer = await asyncio.to_thread(_token_vocabulary, spec.tokenizer) if spec.tokenizer else None
        try:
            return OpenAICompatibleBackend(
                spec.base_url or "",
                resolve_api_key(spec.api_key_secret, self._settings.api_key_dir),
                max_connections=spec.limits.max_concurrency,
                timeout_seconds=spec.limits.timeout_seconds,
                tokenizer=tokenizer,
            )
        except ValueError as exc:
            raise OperationError(grpc.StatusCode.INVALID_ARGUMENT, f"teacher: {exc}") from exc

    async def close(self) -> None:
        for teacher in self._teachers.values():
            await teacher.aclose()
        self._teachers.clear()


def _token_vocabulary(reference: str):
    from stillhouse.teacher import model_loading
    from stillhouse.teacher.token_vocabulary import TokenVocabulary

    return TokenVocabulary.from_tokenizer(model_loading.load_tokenizer_reference(reference))
