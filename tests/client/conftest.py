"""A real control plane over real HTTP for the SDK: scripted stage services that take a moment per stage
and report progress, and a real storage service over a local object store, so that artifacts are listed
and presigned as the platform does."""

from __future__ import annotations

from pathlib import Path

import pytest
from scripted_platform import STAGE_SECONDS, Platform
from storage_process import start_storage
from waiting import grpc_serving, pick_free_port, wait_until

from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.objectstore.settings import ObjectStoreSettings


@pytest.fixture
def platform(start_api, processes, free_port, grpc_ready, wait_until, tmp_path: Path) -> Platform:
    settings = ObjectStoreSettings(backend="local", bucket="stillhouse-sdk", local_root=tmp_path / "objects")
    storage = start_storage(processes, free_port, grpc_ready, wait_until, settings)
    control_plane = start_api(every_stage=True, stage_seconds=STAGE_SECONDS, storage=storage)
    return Platform(control_plane.url, control_plane.token, tmp_path / "inputs", open_object_store(settings))


@pytest.fixture(scope="module")
def module_platform(start_module_api, module_processes, tmp_path_factory) -> Platform:
    """As `platform`, one for the module's tests: for tests that each work on jobs of their own and count
    none of the others'."""
    objects = tmp_path_factory.mktemp("objects")
    settings = ObjectStoreSettings(backend="local", bucket="stillhouse-sdk", local_root=objects)
    storage = start_storage(module_processes, pick_free_port, grpc_serving, wait_until, settings)
    control_plane = start_module_api(every_stage=True, stage_seconds=STAGE_SECONDS, storage=storage)
    return Platform(control_plane.url, control_plane.token, control_plane.inputs, open_object_store(settings))
