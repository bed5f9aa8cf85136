"""A local Ray head for tests and benchmarks, whose workers find what they need in their environment."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stillhouse.common.fanout.settings import FanoutSettings
from stillhouse.common.ray.cluster import LocalRayHead
from stillhouse.common.ray.settings import LocalRaySettings


@contextmanager
def local_ray_head(
    temp_dir: Path, *, num_cpus: int = 2, worker_env: Mapping[str, str] | None = None
) -> Iterator[LocalRayHead]:
    """A started head of `num_cpus` CPUs; `temp_dir` must be short (Ray's socket paths fit in 107 bytes).
    Its workers inherit this process's PYTHONPATH unless `worker_env` sets another."""
    settings = LocalRaySettings(temp_dir=temp_dir, auth_token_file=temp_dir / "auth-token", num_cpus=num_cpus)
    head = LocalRayHead(settings, {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), **(worker_env or {})})
    head.start()
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()


def fanout_to(head: LocalRayHead, **settings: Any) -> FanoutSettings:
    """Fan-out settings that send every stage's shards to `head`."""
    return FanoutSettings(
        ray_address=head.address,
        ray_auth_token_file=head.temp_dir / "auth-token",
        ray_python=sys.executable,
        **{"min_rows": 0, "ray_poll_seconds": 0.2, **settings},
    )
