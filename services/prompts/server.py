"""The prompts service process: builds each job's prompts and held-out datasets (the prompts stage)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from stillhouse.common.grpc_server import ServiceBinding, run_grpc_service
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.operations import OperationRegistry
from stillhouse.common.service_credentials import ServiceCredentials
from stillhouse.prompts.config import PromptsSettings
from stillhouse.prompts.servicer import PromptsServicer
from stillhouse.prompts.v1 import prompts_pb2, prompts_pb2_grpc

SERVICE = prompts_pb2.DESCRIPTOR.services_by_name["Prompts"]


def run(settings: PromptsSettings) -> None:
    @asynccontextmanager
    async def setup(
        registry: OperationRegistry, credentials: ServiceCredentials
    ) -> AsyncIterator[list[ServiceBinding]]:
        store = open_object_store(settings.object_store)
        # The same token (and TLS files) answer callers and go with the calls to the teacher service.
        servicer = PromptsServicer(registry, store, settings, credentials)
        yield [ServiceBinding.of(SERVICE, prompts_pb2_grpc.add_PromptsServicer_to_server, servicer)]

    run_grpc_service("prompts", settings, setup=setup)
