"""The teacher service process: answers prompts datasets through the teacher, cached and within limits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from stillhouse.common.grpc_server import ServiceBinding, ServiceContext, run_grpc_service
from stillhouse.teacher.cache import TeacherCache, expire_periodically
from stillhouse.teacher.config import TeacherSettings
from stillhouse.teacher.ledger import PriceTable
from stillhouse.teacher.servicer import TeacherServicer
from stillhouse.teacher.teachers import TeacherPool
from stillhouse.teacher.v1 import teacher_pb2, teacher_pb2_grpc

SERVICE = teacher_pb2.DESCRIPTOR.services_by_name["Teacher"]


def _start_expiry(settings: TeacherSettings, cache: TeacherCache) -> asyncio.Task | None:
    """The cache's expiry, swept in the background; None when the cache is bounded by neither age nor
    entries."""
    if settings.cache_max_age_days is None and settings.cache_max_entries is None:
        return None
    max_age = None if settings.cache_max_age_days is None else timedelta(days=settings.cache_max_age_days)
    return asyncio.create_task(
        expire_periodically(
            cache,
            max_age=max_age,
            max_entries=settings.cache_max_entries,
            interval_seconds=settings.cache_sweep_interval_seconds,
        ),
        name="teacher cache expiry",
    )


def run(settings: TeacherSettings) -> None:
    @asynccontextmanager
    async def setup(service: ServiceContext) -> AsyncIterator[list[ServiceBinding]]:
        cache = await TeacherCache.open(settings.cache_url)
        prices = PriceTable.load(settings.price_table)
        teachers = TeacherPool(settings)
        expiry = _start_expiry(settings, cache)
        try:
            servicer = TeacherServicer(
                service.registry, service.store, cache, teachers, prices, settings.fanout
            )
            yield [ServiceBinding.of(SERVICE, teacher_pb2_grpc.add_TeacherServicer_to_server, servicer)]
        finally:
            if expiry is not None:
                expiry.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await expiry
            await teachers.close()
            await cache.close()

    run_grpc_service("teacher", settings, setup=setup)
