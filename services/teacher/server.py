"""The teacher service process. This version serves the contract and answers UNIMPLEMENTED for its work."""

from __future__ import annotations

from stillhouse.common.grpc_server import ServiceBinding, not_implemented_servicer, run_grpc_service
from stillhouse.common.operations import OperationRegistry
from stillhouse.teacher.config import TeacherSettings
from stillhouse.teacher.v1 import teacher_pb2, teacher_pb2_grpc

SERVICE = teacher_pb2.DESCRIPTOR.services_by_name["Teacher"]


def build(registry: OperationRegistry) -> list[ServiceBinding]:
    servicer = not_implemented_servicer(teacher_pb2_grpc.TeacherServicer, SERVICE, "teacher")
    return [
        ServiceBinding(
            SERVICE.full_name, lambda server: teacher_pb2_grpc.add_TeacherServicer_to_server(servicer, server)
        )
    ]


def run(settings: TeacherSettings) -> None:
    run_grpc_service("teacher", settings, build)
