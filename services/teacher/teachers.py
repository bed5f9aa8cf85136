"""The teachers this service talks to: one resilient client per teacher spec, built on first use and
kept (a local model loads once; an HTTP teacher keeps its connection pool and rate-limit buckets)."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Mapping
from pathlib import Path

import grpc
import structlog

from stillhouse.common.jobspec import SECRET_NAME_PATTERN, Precision, TeacherBackend, TeacherSpec
from stillhouse.common.models.locator import ModelLocator
from stillhouse.common.objectstore.objects import ObjectStoreError
from stillhouse.common.operations import OperationError
from stillhouse.teacher.backends.base import TeacherBackend as Backend
from stillhouse.teacher.calls import cache_scope
from stillhouse.teacher.config import TeacherSettings
from stillhouse.teacher.egress import EgressPolicy, EgressRefused
from stillhouse.teacher.resilience import ResilientTeacher

log = structlog.get_logger(__name__)


# The environment variables a key may come from: this prefix and the key's name (see `key_variable`).
KEY_VARIABLE_PREFIX = "STILLHOUSE_TEACHER_KEY_"


def key_variable(secret_name: str) -> str:
    """The environment variable that may hold the key named `secret_name`: `KEY_VARIABLE_PREFIX` and the
    name in upper case, with `-` and `.` as `_` (``deepseek-prod``: ``..._KEY_DEEPSEEK_PROD``)."""
    return KEY_VARIABLE_PREFIX + re.sub(r"[^A-Z0-9_]", "_", secret_name.upper())


def resolve_api_key(
    secret_name: str | None, api_key_dir: Path | None, environ: Mapping[str, str] = os.environ
) -> str | None:
    """The key named by `apiKeySecret`, from the key store only: the file of that name in `api_key_dir`
    (inside it, links followed), else the environment variable `key_variable(name)`. A name that is not
    a plain key name is refused, so that no spec reaches another file or variable. Errors name where the
    key was looked for, never a value."""
    if secret_name is None:
        return None
    if not re.fullmatch(SECRET_NAME_PATTERN, secret_name):
        raise OperationError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "spec.teacher.apiKeySecret: a key name is letters, digits, '-', '_' and '.', starting with a "
            "letter or digit, at most 63 characters",
        )
    places = []
    if api_key_dir is not None:
        folder = api_key_dir.resolve()
        file = (api_key_dir / secret_name).resolve()
        if file.is_relative_to(folder) and file.is_file():
            return file.read_text().strip()
        places.append(f"the file {api_key_dir / secret_name}")
    variable = key_variable(secret_name)
    if variable in environ:
        return environ[variable].strip()
    places.append(f"the environment variable {variable}")
    raise OperationError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"API key secret {secret_name!r} not found: looked in {' and '.join(places)}",
    )


def _teacher_key(spec: TeacherSpec) -> str:
    return "|".join(
        [spec.backend.value, spec.base_url or "", spec.model, spec.api_key_secret or "", spec.precision.value]
    )


def _pool_key(spec: TeacherSpec) -> tuple[str, str]:
    return (_teacher_key(spec), spec.limits.model_dump_json())


class TeacherPool:
    def __init__(self, settings: TeacherSettings) -> None:
        self._settings = settings
        self._egress = EgressPolicy.from_entries(settings.egress_allow)
        self._models = ModelLocator(settings.models, settings.object_store)
        self._teachers: dict[tuple[str, str], ResilientTeacher] = {}
        # The API key each teacher was built with: what `cache_scope` fingerprints.
        self._api_keys: dict[tuple[str, str], str | None] = {}
        self._lock = asyncio.Lock()

    async def get(self, spec: TeacherSpec) -> ResilientTeacher:
        """The teacher for `spec`. An HTTP teacher's baseURL is checked against the egress policy every
        time, so that a stage or call for a refused address fails before any request."""
        if spec.backend is TeacherBackend.OPENAI:
            await self._check_egress(spec.base_url or "")
        key = _pool_key(spec)
        async with self._lock:
            if key not in self._teachers:
                backend = await self._backend(spec)
                self._teachers[key] = ResilientTeacher(
                    backend, spec.limits, key=key[0], limiter_storage_uri=self._settings.limiter_storage_uri
                )
                log.info("teacher ready", backend=spec.backend.value, model=spec.model)
            return self._teachers[key]

    def _local_backend(self, model: str, device: str | None, precision: Precision) -> Backend:
        """A local teacher on `model`, downloaded first when it is an s3:// model (this can take minutes)."""
        from stillhouse.teacher.backends.local_hf import LocalHFBackend

        return LocalHFBackend(
            self._models.locate(model, "spec.teacher.model"),
            name=model,
            device=device,
            precision=precision,
            max_batch_size=self._settings.local_max_batch_size,
        )

    def cache_scope(self, spec: TeacherSpec, tenant: str) -> str:
        """Whose cached answers a call of `tenant` to the teacher of `spec` may read: the tenant's, paid
        with the API key that teacher is called with. Ask after `get(spec)`, which resolves the key."""
        return cache_scope(tenant, self._api_keys[_pool_key(spec)])

    async def _backend(self, spec: TeacherSpec) -> Backend:
        if spec.backend is TeacherBackend.LOCAL:
            self._api_keys[_pool_key(spec)] = None
            device = None if self._settings.local_device == "auto" else self._settings.local_device
            try:
                return await asyncio.to_thread(self._local_backend, spec.model, device, spec.precision)
            except (OSError, ValueError, ObjectStoreError) as exc:
                raise OperationError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"cannot load the local teacher {spec.model!r}: {exc}",
                ) from exc
        from stillhouse.teacher.backends.openai_http import OpenAICompatibleBackend

        tokenizer = await asyncio.to_thread(_token_vocabulary, spec.tokenizer) if spec.tokenizer else None
        api_key = resolve_api_key(spec.api_key_secret, self._settings.api_key_dir)
        self._api_keys[_pool_key(spec)] = api_key
        try:
            return OpenAICompatibleBackend(
                spec.base_url or "",
                api_key,
                max_connections=spec.limits.max_concurrency,
                timeout_seconds=spec.limits.timeout_seconds,
                tokenizer=tokenizer,
                egress=self._egress,
            )
        except ValueError as exc:
            raise OperationError(grpc.StatusCode.INVALID_ARGUMENT, f"teacher: {exc}") from exc

    async def _check_egress(self, base_url: str) -> None:
        try:
            await self._egress.check_url(base_url)
        except EgressRefused as exc:
            raise OperationError(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from exc
        except ValueError as exc:
            raise OperationError(grpc.StatusCode.INVALID_ARGUMENT, f"teacher: {exc}") from exc

    async def close(self) -> None:
        for teacher in self._teachers.values():
            await teacher.aclose()
        self._teachers.clear()
        self._api_keys.clear()


def _token_vocabulary(reference: str):
    from stillhouse.common.models import model_loading
    from stillhouse.teacher.token_vocabulary import TokenVocabulary

    return TokenVocabulary.from_tokenizer(model_loading.load_tokenizer_reference(reference))
