"""The trainer service process: trains and evaluates students as Ray jobs, on a cluster or a local head."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from stillhouse.common.grpc_server import ServiceBinding, ServiceContext, run_grpc_service
from stillhouse.trainer.config import TrainerSettings
from stillhouse.trainer.preflight_loading import ModelFactsLoader
from stillhouse.trainer.ray_connection import RayConnection
from stillhouse.trainer.servicer import TrainerServicer
from stillhouse.trainer.v1 import trainer_pb2, trainer_pb2_grpc

SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["Trainer"]


def run(settings: TrainerSettings) -> None:
    @asynccontextmanager
    async def setup(service: ServiceContext) -> AsyncIterator[list[ServiceBinding]]:
        ray = RayConnection(settings)
        try:
            servicer = TrainerServicer(
                service.registry,
                service.store,
                settings.object_store,
                ray,
                ModelFactsLoader(settings.object_store, settings.preflight_dir, settings.models),
                evaluation_num_gpus=settings.evaluation_num_gpus,
                evaluation_num_cpus=settings.evaluation_num_cpus,
                models=settings.models,
            )
            yield [ServiceBinding.of(SERVICE, trainer_pb2_grpc.add_TrainerServicer_to_server, servicer)]
        finally:
            ray.close()

    run_grpc_service("trainer", settings, setup=setup)
