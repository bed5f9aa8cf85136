"""Shard functions for the fan-out tests: Ray workers import them by name, so they live on the path."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import grpc

from stillhouse.common.operations import OperationError


async def count_rows(payload: dict[str, Any], report) -> dict[str, Any]:
    """Counts its rows, reporting each; leaves `<dir>/shard-<index>` as its commit. `crash_once` kills its
    worker the first time (a marker remembers); `refuse` ends the stage; `pause` seconds per row."""
    folder = Path(payload["dir"])
    index = payload["index"]
    attempt_marker = folder / f"attempt-{index}-{os.getpid()}"
    attempt_marker.touch()
    if payload.get("refuse"):
        raise OperationError(grpc.StatusCode.FAILED_PRECONDITION, f"shard {index} refuses its rows")
    for done in range(1, payload["rows"] + 1):
        await asyncio.sleep(payload.get("pause", 0.0))
        report({"rows": done})
    crashed_marker = folder / f"crashed-{index}"
    if payload.get("crash_once") and not crashed_marker.exists():
        crashed_marker.touch()
        os._exit(1)
    (folder / f"shard-{index}").write_text(str(payload["rows"]))
    return {"index": index, "rows": payload["rows"]}
