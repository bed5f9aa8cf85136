"""The storage service process: owns the bucket and its layout, manifests and lineage."""

from __future__ import annotations

import structlog

from stillhouse.common.grpc_server import ServiceBinding, run_grpc_service
from stillhouse.common.objectstore.objects import ObjectStoreError
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.operations import OperationRegistry
from stillhouse.storage.config import StorageSettings
from stillhouse.storage.servicer import StorageServicer
from stillhouse.storage.v1 import storage_pb2, storage_pb2_grpc

SERVICE = storage_pb2.DESCRIPTOR.services_by_name["Storage"]

log = structlog.get_logger(__name__)


def run(settings: StorageSettings) -> None:
    store = open_object_store(settings.object_store)

    def build(registry: OperationRegistry) -> list[ServiceBinding]:
        try:
            store.ensure_bucket()
        except ObjectStoreError as exc:
            # Not fatal: the store may come up later; each call reports its own failure meanwhile.
            log.warning("bucket not ready", bucket=store.bucket, error=str(exc))
        servicer = StorageServicer(store, presign_max_seconds=settings.presign_max_seconds)
        return [ServiceBinding.of(SERVICE, storage_pb2_grpc.add_StorageServicer_to_server, servicer)]

    run_grpc_service("storage", settings, build)
