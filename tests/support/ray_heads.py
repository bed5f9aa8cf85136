"""A local Ray head for tests and benchmarks, whose workers find what they need in their environment."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from stillhouse.common.fanout.settings import FanoutSettings
from stillhouse.common.ray.cluster import LocalRayHead
from stillhouse.common.ray.settings import LocalRaySettings


@contextmanager
def short_temp_dir() -> Iterator[Path]:
    """A new folder right under the system's temp dir, removed afterwards: Ray's socket paths must fit in
    107 bytes (`MAX_RAY_TEMP_DIR_CHARS`), and a pytest temp folder may be too long for them (longer still
    under pytest-xdist, which adds a folder per worker)."""
    path = Path(tempfile.mkdtemp(prefix="sh-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def local_ray_head(
    temp_dir: Path | None = None, *, num_cpus: int = 2, worker_env: Mapping[str, str] | None = None
) -> Iterator[LocalRayHead]:
    """A started head of `num_cpus` CPUs, its files in `temp_dir` (short: see `short_temp_dir`, a new one
    of which it uses by default). Its workers inherit this process's PYTHONPATH unless `worker_env` sets
    another."""
    with ExitStack() as stack:
        temp_dir = temp_dir or stack.enter_context(short_temp_dir())
        settings = LocalRaySettings(
            temp_dir=temp_dir, auth_token_file=temp_dir / "auth-token", num_cpus=num_cpus
        )
        environment = {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), **(worker_env or {})}
        head = LocalRayHead(settings, environment)
        head.start()
        stack.callback(head.stop)
        head.wait_ready()
        yield head


def fanout_to(head: LocalRayHead, **settings: Any) -> FanoutSettings:
    """Fan-out settings that send every stage's shards to `head`."""
    return FanoutSettings(
        ray_address=head.address,
        ray_auth_token_file=head.temp_dir / "auth-token",
        ray_python=sys.executable,
        **{"min_rows": 0, "ray_poll_seconds": 0.2, **settings},
    )
