"""The trainer service's way to its Ray cluster: the configured address, or a local head started on first
use; with the interpreter and Ray Train storage path that jobs on that cluster use."""

from __future__ import annotations

import asyncio
import os
import sys

from stillhouse.common.ray.cluster import LocalRayHead, RayHeadError, RayUnreachable, auth_headers
from stillhouse.trainer.config import TrainerSettings
from stillhouse.trainer.ray_credentials import key_environment
from stillhouse.trainer.ray_jobs import RayJobs


class RayConnection:
    def __init__(self, settings: TrainerSettings) -> None:
        self._settings = settings
        self._head: LocalRayHead | None = None
        self._jobs: RayJobs | None = None
        self._lock = asyncio.Lock()

    @property
    def embedded(self) -> bool:
        return self._settings.ray_address is None

    @property
    def python(self) -> str:
        return self._settings.ray_python or (sys.executable if self.embedded else "python")

    @property
    def storage_path(self) -> str | None:
        """Ray Train's storage: the configured path, the local head's folder, or None on a cluster (the
        run's folder in object storage, which every node reaches)."""
        if self._settings.ray_storage_path:
            return self._settings.ray_storage_path
        return str(self._settings.local_ray.temp_dir / "train") if self.embedded else None

    def local_capacity(self) -> tuple[int, int] | None:
        """CPUs and GPUs of the local head (which never grows); None for a cluster, which may autoscale."""
        if not self.embedded:
            return None
        local = self._settings.local_ray
        gpus = local.num_gpus
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        return local.num_cpus or os.cpu_count() or 1, gpus

    async def jobs(self) -> RayJobs:
        """The job API, checked reachable now; RayUnreachable (the cluster, or the local head, does not
        answer) otherwise."""
        async with self._lock:
            if self._jobs is None:
                self._jobs = await self._connect()
        await asyncio.to_thread(self._jobs.check_reachable)
        return self._jobs

    async def _connect(self) -> RayJobs:
        settings = self._settings
        if settings.ray_address is not None:
            token = settings.ray_auth_token()
            address = settings.ray_address
        else:
            head = LocalRayHead(settings.local_ray, key_environment(settings.object_store))
            # Spawned on the event loop's thread: the head's parent-death signal follows that thread.
            head.start()
            self._head = head
            try:
                await asyncio.to_thread(head.wait_ready)
            except RayHeadError as exc:
                self._head = None
                head.stop()
                raise RayUnreachable(f"cannot start the local Ray head: {exc}") from exc
            token, address = head.token, head.address
        return RayJobs(
            address,
            headers=auth_headers(token),
            connect_timeout_seconds=settings.ray_connect_timeout_seconds,
            poll_seconds=settings.ray_poll_seconds,
        )

    def close(self) -> None:
        if self._head is not None:
            self._head.stop()
            self._head = None
