"""The trainer service process. This version serves the contract and answers UNIMPLEMENTED for its work."""

from __future__ import annotations

from stillhouse.common.grpc_server import ServiceBinding, not_implemented_servicer, run_grpc_service
from stillhouse.common.operations import OperationRegistry
from stillhouse.trainer.config import TrainerSettings
from stillhouse.trainer.v1 import trainer_pb2, trainer_pb2_grpc

SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["Trainer"]


def build(registry: OperationRegistry) -> list[ServiceBinding]:
    servicer = not_implemented_servicer(trainer_pb2_grpc.TrainerServicer, SERVICE, "trainer")
    return [
        ServiceBinding(
            SERVICE.full_name, lambda server: trainer_pb2_grpc.add_TrainerServicer_to_server(servicer, server)
        )
    ]


def run(settings: TrainerSettings) -> None:
    run_grpc_service("trainer", settings, build)
