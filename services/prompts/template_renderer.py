"""Templates render in a process of their own, which a limit or a cancelled job can end at once.

A template is code from the job spec. `template_sandbox` refuses what it can see coming; the rest (a
filter that builds a huge string, loops that print nothing for hours) is bounded here. The renderer
process may use `MEMORY_BYTES` more address space than it had when it started, and each prompt gets
`RENDER_SECONDS`: the parent kills the process when a prompt takes longer, or when the rendering is
closed (the job was cancelled, or its consumer stopped early). A CPU limit inside the process backs
up the parent's clock, and ends a renderer whose parent died while it rendered.

One process serves one rendering (one stage run) and starts when the first chunk is rendered.
Combinations go to it a chunk at a time and come back as prompts in batches, sent at least every
`FLUSH_SECONDS` while it renders, so that a silence longer than `RENDER_SECONDS + FLUSH_SECONDS` means
one prompt took too long. The process is a fresh interpreter (`python -m` this module), not a fork:
the service runs gRPC and asyncio threads. It is started with `subprocess` rather than multiprocessing's
spawn, which would import the parent's `__main__` into every renderer (the whole CLI, in the service).
"""

from __future__ import annotations

import math
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

from stillhouse.prompts.template_sandbox import BoundedSandbox, TemplateError, render_bounded

# Combinations sent to the renderer at once.
RENDER_CHUNK = 256
# Time one prompt may take to render.
RENDER_SECONDS = 1.0
# Address space a renderer may add to what the bare interpreter uses: a chunk of the longest prompts
# takes at most 64 MiB of it.
MEMORY_BYTES = 512 * 2**20
# Longest wait between two batches of prompts while a chunk renders.
FLUSH_SECONDS = 0.05
# Allowance for scheduling and the pipe on top of the time a prompt may take.
REPLY_SLACK_SECONDS = 0.5
# CPU seconds a prompt may use beyond RENDER_SECONDS before the kernel ends the renderer: a little
# looser than the parent's clock, whose error names the limit.
CPU_GRACE_SECONDS = 2
# A spawned interpreter on a busy machine.
START_SECONDS = 60.0
STOP_SECONDS = 5.0

READY, RENDERED, FAILED = "ready", "rendered", "failed"  # what the renderer sends


class RendererClosed(Exception):
    """The rendering was closed, perhaps while a chunk was rendering."""


class TemplateRenderer:
    """The parent's end of one renderer process. `render` is called from one thread at a time; `close`
    may be called from any thread, also while `render` waits, and ends the process at once."""

    def __init__(self, source: str, names: Sequence[str]) -> None:
        self._source = source
        self._names = list(names)
        self._seconds_per_prompt = RENDER_SECONDS
        self._lock = threading.Lock()  # held while `render` talks to the process
        self._closed = False
        self._process: subprocess.Popen[bytes] | None = None
        self._connection: Connection | None = None
        self._release: weakref.finalize | None = None
        self.pid: int | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def render(self, combinations: list[list[str]]) -> list[str]:
        """One prompt per combination (slot values in the order of `names`). Raises `TemplateError` for
        a template that fails or exceeds a limit, `RendererClosed` once `close` was called; either way
        the process is gone."""
        with self._lock:
            try:
                return self._render(combinations)
            except BaseException:
                self._shut_down()
                raise

    def close(self) -> None:
        self._closed = True
        process = self._process
        if process is not None:
            _stop(process)  # a `render` waiting on the process wakes up to its end
        if self._lock.acquire(blocking=False):
            try:
                self._shut_down()
            finally:
                self._lock.release()

    def __enter__(self) -> TemplateRenderer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _render(self, combinations: list[list[str]]) -> list[str]:
        if self._closed:
            raise RendererClosed
        try:
            if self._connection is None:
                self._start()
            assert self._connection is not None
            self._connection.send(combinations)
            texts: list[str] = []
            while len(texts) < len(combinations):
                if not self._connection.poll(self._seconds_per_prompt + FLUSH_SECONDS + REPLY_SLACK_SECONDS):
                    raise self._too_slow()
                kind, payload = self._connection.recv()
                if kind == FAILED:
                    raise TemplateError(payload)
                texts.extend(payload)
            return texts
        except (EOFError, OSError):
            if self._closed:
                raise RendererClosed from None
            raise self._ended_unexpectedly() from None

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
            )
            connection = Connection(ours.detach())
        self._process, self._connection, self.pid = process, connection, process.pid
        self._release = weakref.finalize(self, _release, process, connection)
        if self._closed:  # `close` ran before there was a process to stop
            raise RendererClosed
        try:
            connection.send((self._source, self._names, self._seconds_per_prompt))
            started = connection.poll(START_SECONDS) and connection.recv() == READY
        except (EOFError, OSError):
            if self._closed:
                raise RendererClosed from None
            started = False
        if not started:
            _stop(process)
            raise RuntimeError(
                f"the template renderer process did not start within {START_SECONDS:g} s "
                f"(exit code {process.returncode})"
            )

    def _shut_down(self) -> None:
        if self._release is not None:
            self._release()

    def _too_slow(self) -> TemplateError:
        return TemplateError(
            f"template took more than {self._seconds_per_prompt:g} s to render one prompt, "
            "the limit for one prompt"
        )

    def _ended_unexpectedly(self) -> TemplateError:
        assert self._process is not None
        _stop(self._process)
        code = self._process.returncode
        if code == -signal.SIGXCPU:
            return self._too_slow()
        return TemplateError(
            f"the template renderer process ended while rendering (exit code {code}): the template "
            f"may need more than the {MEMORY_BYTES // 2**20} MiB of memory a render may use"
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait(STOP_SECONDS)


def _release(process: subprocess.Popen[bytes], connection: Connection) -> None:
    _stop(process)
    connection.close()


# --- in the renderer process ---------------------------------------------------------------------


def _serve(connection: Connection) -> None:
    """Render each chunk of combinations the parent sends, until it closes the pipe or a prompt fails."""
    # The CPU limit ends a renderer with SIGXCPU, whose default action would write a core file.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _limit_memory()
    try:
        source, names, seconds_per_prompt = connection.recv()
    except EOFError:
        return
    template = BoundedSandbox().from_string(source)  # the parent compiled the same source already
    connection.send(READY)
    while True:
        try:
            combinations = connection.recv()
        except EOFError:
            return
        texts: list[str] = []
        flushed = time.monotonic()
        for combination in combinations:
            _limit_cpu(seconds_per_prompt)
            try:
                texts.append(render_bounded(template, dict(zip(names, combination, strict=True))))
            except MemoryError:
                connection.send((FAILED, _out_of_memory()))
                return
            except TemplateError as error:
                connection.send((FAILED, str(error)))
                return
            if time.monotonic() - flushed >= FLUSH_SECONDS:
                connection.send((RENDERED, texts))
                texts, flushed = [], time.monotonic()
        if texts:
            connection.send((RENDERED, texts))


def _out_of_memory() -> str:
    return (
        f"template needs more than {MEMORY_BYTES // 2**20} MiB of memory to render one prompt, "
        "the limit for rendering"
    )


def _limit_memory() -> None:
    statm = Path("/proc/self/statm")
    if not statm.exists():
        return  # not Linux: the address space in use is unknown, and the time limit bounds a render
    in_use = int(statm.read_text().split()[0]) * resource.getpagesize()
    _set_soft_limit(resource.RLIMIT_AS, in_use + MEMORY_BYTES)


def _limit_cpu(seconds_per_prompt: float) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    _set_soft_limit(resource.RLIMIT_CPU, math.ceil(used + seconds_per_prompt) + CPU_GRACE_SECONDS)


def _set_soft_limit(kind: int, soft: int) -> None:
    hard = resource.getrlimit(kind)[1]
    resource.setrlimit(kind, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
