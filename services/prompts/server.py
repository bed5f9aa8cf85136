"""The prompts service process: builds each job's prompts and held-out datasets (the prompts stage)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from stillhouse.common.grpc_server import ServiceBinding, ServiceContext, run_grpc_service
from stillhouse.prompts.config import PromptsSettings
from stillhouse.prompts.servicer import PromptsServicer
from stillhouse.prompts.v1 import prompts_pb2, prompts_pb2_grpc

SERVICE = prompts_pb2.DESCRIPTOR.services_by_name["Prompts"]


def run(settings: PromptsSettings) -> None:
    @asynccontextmanager
    async def setup(service: ServiceContext) -> AsyncIterator[list[ServiceBinding]]:
        # The same token (and TLS files) answer callers and go with the calls to the teacher service.
        servicer = PromptsServicer(service.registry, service.store, settings, service.credentials)
        yield [ServiceBinding.of(SERVICE, prompts_pb2_grpc.add_PromptsServicer_to_server, servicer)]

    run_grpc_service("prompts", settings, setup=setup)
