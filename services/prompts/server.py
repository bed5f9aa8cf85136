"""The prompts service process. This version serves the contract and answers UNIMPLEMENTED for its work."""

from __future__ import annotations

from stillhouse.common.grpc_server import ServiceBinding, not_implemented_servicer, run_grpc_service
from stillhouse.common.operations import OperationRegistry
from stillhouse.prompts.config import PromptsSettings
from stillhouse.prompts.v1 import prompts_pb2, prompts_pb2_grpc

SERVICE = prompts_pb2.DESCRIPTOR.services_by_name["Prompts"]


def build(registry: OperationRegistry) -> list[ServiceBinding]:
    servicer = not_implemented_servicer(prompts_pb2_grpc.PromptsServicer, SERVICE, "prompts")
    return [
        ServiceBinding(
            SERVICE.full_name, lambda server: prompts_pb2_grpc.add_PromptsServicer_to_server(servicer, server)
        )
    ]


def run(settings: PromptsSettings) -> None:
    run_grpc_service("prompts", settings, build)
