"""The storage service process. This version serves the contract and answers UNIMPLEMENTED for its work."""

from __future__ import annotations

from stillhouse.common.grpc_server import ServiceBinding, not_implemented_servicer, run_grpc_service
from stillhouse.common.operations import OperationRegistry
from stillhouse.storage.config import StorageSettings
from stillhouse.storage.v1 import storage_pb2, storage_pb2_grpc

SERVICE = storage_pb2.DESCRIPTOR.services_by_name["Storage"]


def build(registry: OperationRegistry) -> list[ServiceBinding]:
    servicer = not_implemented_servicer(storage_pb2_grpc.StorageServicer, SERVICE, "storage")
    return [
        ServiceBinding(
            SERVICE.full_name, lambda server: storage_pb2_grpc.add_StorageServicer_to_server(servicer, server)
        )
    ]


def run(settings: StorageSettings) -> None:
    run_grpc_service("storage", settings, build)
