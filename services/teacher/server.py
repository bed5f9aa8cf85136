"""The teacher service process: answers prompts datasets through the teacher, cached and within limits."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

import structlog

from stillhouse.common.grpc_server import ServiceBinding, serve_grpc
from stillhouse.common.logging import configure_logging
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.operations import OperationRegistry
from stillhouse.teacher.cache import TeacherCache, expire_periodically
from stillhouse.teacher.config import TeacherSettings
from stillhouse.teacher.ledger import PriceTable
from stillhouse.teacher.servicer import TeacherServicer
from stillhouse.teacher.teachers import TeacherPool
from stillhouse.teacher.v1 import teacher_pb2, teacher_pb2_grpc

SERVICE = teacher_pb2.DESCRIPTOR.services_by_name["Teacher"]

log = structlog.get_logger(__name__)


async def serve(settings: TeacherSettings) -> None:
    store = open_object_store(settings.object_store)
    cache = await TeacherCache.open(settings.cache_url)
    prices = PriceTable.load(settings.price_table)
    teachers = TeacherPool(settings)

    def build(registry: OperationRegistry) -> list[ServiceBinding]:
        servicer = TeacherServicer(registry, store, cache, teachers, prices)
        return [
            ServiceBinding(
                SERVICE.full_name,
                lambda server: teacher_pb2_grpc.add_TeacherServicer_to_server(servicer, server),
            )
        ]

    expiry = None
    if settings.cache_max_age_days is not None or settings.cache_max_entries is not None:
        max_age = None if settings.cache_max_age_days is None else timedelta(days=settings.cache_max_age_days)
        expiry = asyncio.create_task(
            expire_periodically(
                cache,
                max_age=max_age,
                max_entries=settings.cache_max_entries,
                interval_seconds=settings.cache_sweep_interval_seconds,
            ),
            name="teacher cache expiry",
        )
    try:
        await serve_grpc(settings, build)
    finally:
        if expiry is not None:
            expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry
        await teachers.close()
        await cache.close()


def run(settings: TeacherSettings) -> None:
    configure_logging(settings.log_level, settings.log_format, service="teacher")
    asyncio.run(serve(settings))
