"""The trainer service process: trains and evaluates students as Ray jobs, on a cluster or a local head."""

from __future__ import annotations

import asyncio

from stillhouse.common.grpc_server import ServiceBinding, serve_grpc
from stillhouse.common.logging import configure_logging
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.operations import OperationRegistry
from stillhouse.trainer.config import TrainerSettings
from stillhouse.trainer.preflight_loading import ModelFactsLoader
from stillhouse.trainer.ray_connection import RayConnection
from stillhouse.trainer.servicer import TrainerServicer
from stillhouse.trainer.v1 import trainer_pb2, trainer_pb2_grpc

SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["Trainer"]


async def serve(settings: TrainerSettings) -> None:
    store = open_object_store(settings.object_store)
    ray = RayConnection(settings)

    def build(registry: OperationRegistry) -> list[ServiceBinding]:
        servicer = TrainerServicer(
            registry,
            store,
            settings.object_store,
            ray,
            ModelFactsLoader(settings.object_store, settings.preflight_dir),
            evaluation_num_gpus=settings.evaluation_num_gpus,
        )
        return [
            ServiceBinding(
                SERVICE.full_name,
                lambda server: trainer_pb2_grpc.add_TrainerServicer_to_server(servicer, server),
            )
        ]

    try:
        await serve_grpc(settings, build)
    finally:
        ray.close()


def run(settings: TrainerSettings) -> None:
    configure_logging(settings.log_level, settings.log_format, service="trainer")
    asyncio.run(serve(settings))
