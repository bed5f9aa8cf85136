"""The prompts service process: builds each job's prompts and held-out datasets (stage 1)."""

from __future__ import annotations

import asyncio

from stillhouse.common.grpc_server import ServiceBinding, serve_grpc
from stillhouse.common.logging import configure_logging
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.operations import OperationRegistry
from stillhouse.common.service_credentials import ServiceCredentials
from stillhouse.prompts.config import PromptsSettings
from stillhouse.prompts.servicer import PromptsServicer
from stillhouse.prompts.v1 import prompts_pb2, prompts_pb2_grpc

SERVICE = prompts_pb2.DESCRIPTOR.services_by_name["Prompts"]


async def serve(settings: PromptsSettings) -> None:
    store = open_object_store(settings.object_store)
    # The same token (and TLS files) answer callers and go with the calls to the teacher service.
    credentials = ServiceCredentials.load(settings)

    def build(registry: OperationRegistry) -> list[ServiceBinding]:
        servicer = PromptsServicer(registry, store, settings, credentials)
        return [
            ServiceBinding(
                SERVICE.full_name,
                lambda server: prompts_pb2_grpc.add_PromptsServicer_to_server(servicer, server),
            )
        ]

    await serve_grpc(settings, build, credentials)


def run(settings: PromptsSettings) -> None:
    configure_logging(settings.log_level, settings.log_format, service="prompts")
    asyncio.run(serve(settings))
