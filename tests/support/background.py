"""Servers run as child processes for a block of code: started, waited for, and always stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class ServerDidNotStart(RuntimeError):
    pass


@contextmanager
def background_server(
    name: str,
    argv: list[str],
    log_path: Path,
    ready: Callable[[], bool],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    own_process_group: bool = False,
) -> Iterator[subprocess.Popen]:
    """Run `argv` with its output in `log_path` until the block ends, once `ready()` is true.

    `ServerDidNotStart`, with the end of the log, if it exits or is not ready within `timeout` seconds.
    With `own_process_group` the server and every process it starts are stopped together.
    """
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=own_process_group,
        )
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise ServerDidNotStart(f"{name} did not start (exit code {process.poll()}):\n{tail}")
            time.sleep(0.1)
        yield process
    finally:
        if own_process_group:
            stop_process_group(process)
        else:
            stop_process(process)


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it is still running 10 s later."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group `process` leads, then SIGKILL if it is still running."""
    for sig, grace_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            continue
