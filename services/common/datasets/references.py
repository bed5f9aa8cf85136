"""A committed dataset as the `DatasetRef` a stage's result hands on to the next stage."""

from __future__ import annotations

from stillhouse.common.datasets.manifest import DatasetManifest, manifest_key, manifest_sha256
from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.common.v1 import operations_pb2


def dataset_reference(store: ObjectStore, committed: DatasetManifest) -> operations_pb2.DatasetRef:
    """Where `committed`'s manifest lies in `store`, with its sha256 and row count."""
    return operations_pb2.DatasetRef(
        dataset_id=committed.dataset_id,
        manifest_uri=store.uri(manifest_key(committed.dataset_id)),
        manifest_sha256=manifest_sha256(committed.to_json()),
        num_rows=committed.num_rows,
    )
