"""Client CPU per teacher answer: what one process spends to send a request and read a ~110 KB answer
with top-20 logprobs into the backend's result types, for the teacher backend and for other HTTP
clients, on the same answers at the same concurrency, in one run.

    cd bench && ../.venv/bin/python scale_client_cpu.py [--answers 2000] [--concurrency 32]

The server is the fake OpenAI-compatible server of the tests (`tests/teacher/fake_openai.py`, a
subprocess, so its CPU is not counted): 64-token answers with the top-20 logprobs of every token.
Every contender sends the backend's own request bodies (vLLM's `return_tokens_as_token_ids`, so ids
come from the server) with at most `concurrency` requests in flight over a keep-alive pool of that
size, and, unless its name says otherwise, turns each body into a `TeacherAnswer` with
`openai_wire.parse_chat_completion` (msgspec, straight from bytes):

- backend: `OpenAICompatibleBackend.answer` (aiohttp, with the egress policy checking connections);
- aiohttp: `ClientSession.post` + `read()`, the same client without the backend around it;
- httpx stream: `AsyncClient.stream` with the chunks joined, as the backend read bodies before aiohttp;
- httpx json: `AsyncClient.post` + `response.json()` with the tokens and top-k pairs pulled into
  lists (no `TeacherAnswer`): the plain client of `teacher_http_bench.py`;
- curl_cffi and pyreqwest (libcurl; Rust's reqwest), when installed: neither is a dependency.

Method: client CPU is `time.process_time()` of this process (every thread of it) around the timed
requests, divided by the answers; a contender's client is made and its pool filled by one untimed
batch first. The answers are split into `ROUNDS` rounds; each round runs every contender once, the
order reversed from one round to the next, and each figure is the contender's best round (noise on
a shared machine only ever adds CPU). Every contender's answers must be the backend's, or the run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import msgspec
from _table import print_grid, verdict
from teacher_http_bench import _read_answer, conversations, fake_openai, teacher_spec

from stillhouse.teacher.backends import openai_wire
from stillhouse.teacher.backends.openai_http import OpenAICompatibleBackend
from stillhouse.teacher.calls import TeacherAnswer, TeacherCall
from stillhouse.teacher.egress import EgressPolicy
from stillhouse.teacher.shards import call_for

TARGET_CPU_MS = 4.0
ROUNDS = 2
HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
TIMEOUT_S = 120.0

Answer = Callable[[int], Awaitable[Any]]


@dataclass
class Workload:
    base_url: str
    calls: list[TeacherCall]
    bodies: list[bytes]  # the backend's request bodies, encoded
    concurrency: int

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def parse(self, index: int, body: bytes) -> TeacherAnswer:
        return openai_wire.parse_chat_completion(
            body, self.calls[index], None, ids_from_server=True, latency_seconds=0.0
        )


# --- the contenders: each yields a function answering call i -----------------------------------------


@asynccontextmanager
async def backend_client(work: Workload) -> AsyncIterator[Answer]:
    # As the teacher service makes it: connections checked by an egress policy (loopback allowed here).
    backend = OpenAICompatibleBackend(
        work.base_url,
        None,
        max_connections=work.concurrency,
        egress=EgressPolicy.from_entries(["127.0.0.0/8"]),
    )
    try:
        yield lambda index: backend.answer(work.calls[index])
    finally:
        await backend.aclose()


@asynccontextmanager
async def aiohttp_client(work: Workload) -> AsyncIterator[Answer]:
    connector = aiohttp.TCPConnector(limit=work.concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=TIMEOUT_S, sock_read=TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, headers=HEADERS, timeout=timeout) as session:

        async def answer(index: int) -> TeacherAnswer:
            async with session.post(work.url, data=work.bodies[index]) as response:
                response.raise_for_status()
                return work.parse(index, await response.read())

        yield answer


def _httpx(work: Workload) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=work.concurrency, max_keepalive_connections=work.concurrency)
    return httpx.AsyncClient(headers=HEADERS, limits=limits, timeout=httpx.Timeout(TIMEOUT_S, pool=None))


@asynccontextmanager
async def httpx_stream_client(work: Workload) -> AsyncIterator[Answer]:
    async with _httpx(work) as client:

        async def answer(index: int) -> TeacherAnswer:
            async with client.stream("POST", work.url, content=work.bodies[index]) as response:
                response.raise_for_status()
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
            return work.parse(index, bytes(body))

        yield answer


@asynccontextmanager
async def httpx_json_client(work: Workload) -> AsyncIterator[Answer]:
    async with _httpx(work) as client:

        async def answer(index: int) -> tuple[str, str, list[str], list[list[tuple[str, float]]]]:
            response = await client.post(work.url, content=work.bodies[index])
            response.raise_for_status()
            return _read_answer(response.json())

        yield answer


@asynccontextmanager
async def curl_cffi_client(work: Workload) -> AsyncIterator[Answer]:
    from curl_cffi.requests import AsyncSession

    async with AsyncSession(max_clients=work.concurrency, headers=HEADERS, timeout=TIMEOUT_S) as session:

        async def answer(index: int) -> TeacherAnswer:
            response = await session.post(work.url, data=work.bodies[index])
            response.raise_for_status()
            return work.parse(index, response.content)

        yield answer


@asynccontextmanager
async def pyreqwest_client(work: Workload) -> AsyncIterator[Answer]:
    from pyreqwest.client import ClientBuilder

    builder = (
        ClientBuilder()
        .default_headers(HEADERS)
        .max_connections(work.concurrency)
        .read_timeout(timedelta(seconds=TIMEOUT_S))
        .error_for_status(True)
    )
    async with builder.build() as client:

        async def answer(index: int) -> TeacherAnswer:
            request = client.post(work.url).body_bytes(work.bodies[index]).build()
            response = await request.send()
            return work.parse(index, bytes(await response.bytes()))

        yield answer


ClientMaker = Callable[[Workload], AbstractAsyncContextManager[Answer]]


@dataclass
class Contender:
    name: str
    make: ClientMaker
    module: str = ""  # an optional package the contender needs
    cpu_ms: list[float] = field(default_factory=list)  # per round
    rates: list[float] = field(default_factory=list)  # answers per second, per round

    @property
    def missing(self) -> str:
        if self.module and importlib.util.find_spec(self.module) is None:
            return f"not installed (pip install {self.module.replace('_', '-')} to compare)"
        return ""


def contenders() -> list[Contender]:
    return [
        Contender("backend: OpenAICompatibleBackend (aiohttp)", backend_client),
        Contender("aiohttp: post + read()", aiohttp_client),
        Contender("httpx stream, chunks joined (the backend before)", httpx_stream_client),
        Contender("httpx: post + response.json(), lists (no TeacherAnswer)", httpx_json_client),
        Contender("curl_cffi AsyncSession: post + content", curl_cffi_client, module="curl_cffi"),
        Contender("pyreqwest Client: post + bytes()", pyreqwest_client, module="pyreqwest"),
    ]


# --- the benchmark ------------------------------------------------------------------------------------


async def _answer_all(answer: Answer, indices: range, concurrency: int) -> list[Any]:
    slots = asyncio.Semaphore(concurrency)

    async def one(index: int) -> Any:
        async with slots:
            return await answer(index)

    return await asyncio.gather(*(one(index) for index in indices))


async def _round(contender: Contender, work: Workload, indices: range) -> list[Any]:
    """One timed pass of `contender` over `indices`; records its CPU and rate, returns its answers."""
    async with contender.make(work) as answer:
        await _answer_all(answer, range(work.concurrency), work.concurrency)  # fills the pool, untimed
        started, cpu_started = time.perf_counter(), time.process_time()
        answers = await _answer_all(answer, indices, work.concurrency)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    contender.cpu_ms.append(1000 * cpu / len(indices))
    contender.rates.append(len(indices) / seconds)
    return answers


def _same(answer: Any, reference: TeacherAnswer) -> bool:
    if not isinstance(answer, TeacherAnswer):  # the json contender's lists: its text is checked
        return answer[0] == reference.text
    ours, theirs = answer.logprobs, reference.logprobs
    return (
        answer.text == reference.text
        and ours is not None
        and theirs is not None
        and (ours.token_ids == theirs.token_ids).all()
        and (ours.topk_ids == theirs.topk_ids).all()
        and (ours.topk_logprobs == theirs.topk_logprobs).all()
    )


async def _bench(answers: int, concurrency: int) -> list[Contender]:
    players = contenders()
    present = [contender for contender in players if not contender.missing]
    with (
        tempfile.TemporaryDirectory(prefix="client-cpu-bench-") as folder,
        fake_openai(Path(folder) / "fake-openai.log") as base_url,
    ):
        spec = teacher_spec(base_url, concurrency)
        calls = [call_for(spec, messages, scope="") for messages in conversations(answers)]
        bodies = [
            msgspec.json.encode(openai_wire.chat_request(call, token_ids_from_server=True)) for call in calls
        ]
        work = Workload(base_url, calls, bodies, concurrency)
        share = -(-answers // ROUNDS)
        for round_index in range(ROUNDS):
            indices = range(round_index * share, min(answers, (round_index + 1) * share))
            by_name = {}
            for contender in present if round_index % 2 == 0 else present[::-1]:
                by_name[contender.name] = await _round(contender, work, indices)
            reference = by_name[present[0].name]
            for contender in present:
                got = by_name[contender.name]
                differ = sum(not _same(a, b) for a, b in zip(got, reference, strict=True))
                if differ:
                    raise RuntimeError(
                        f"{contender.name}: {differ} of {len(indices)} answers differ from the backend's"
                    )
    return players


def _rows(players: list[Contender], answers: int, concurrency: int) -> list[dict]:
    backend = players[0]
    rows = []
    for contender in players:
        if contender.missing:
            rows.append(
                {
                    "contender": contender.name,
                    "cpu_ms_per_answer": None,
                    "answers_per_s": None,
                    "cpu_vs_backend": None,
                    "note": contender.missing,
                    "pass": None,
                }
            )
            continue
        cpu = min(contender.cpu_ms)
        rows.append(
            {
                "contender": contender.name,
                "cpu_ms_per_answer": round(cpu, 2),
                "answers_per_s": round(max(contender.rates), 1),
                "cpu_vs_backend": round(cpu / min(backend.cpu_ms), 2),
                "note": "CPU ms of each round: " + ", ".join(f"{ms:.2f}" for ms in contender.cpu_ms),
                "pass": None,
            }
        )
    best = min(backend.cpu_ms)
    rows.append(
        {
            "contender": "target",
            "cpu_ms_per_answer": round(best, 2),
            "answers_per_s": round(1000 / best, 1),  # what one process's CPU allows
            "cpu_vs_backend": None,
            "note": (
                f"backend client CPU <= {TARGET_CPU_MS} ms per ~110 KB answer ({answers} answers, "
                f"concurrency {concurrency}, best of {ROUNDS} rounds)"
            ),
            "pass": best <= TARGET_CPU_MS,
        }
    )
    return rows


def run(answers: int = 2000, concurrency: int = 32) -> list[dict]:
    """One row per contender (client CPU ms per answer, answers/s, CPU relative to the backend's), then
    the `target` row: the backend's CPU against TARGET_CPU_MS."""
    if answers < ROUNDS * concurrency:
        raise ValueError(f"answers must be at least {ROUNDS * concurrency} ({ROUNDS} rounds of concurrency)")
    return _rows(asyncio.run(_bench(answers, concurrency)), answers, concurrency)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    rows = run(args.answers, args.concurrency)
    headers = ["contender", "cpu_ms_per_answer", "answers_per_s", "cpu_vs_backend", "note"]
    print_grid(
        [*headers, "pass"],
        [[_cell(row[name]) for name in headers] + [verdict(row["pass"])] for row in rows],
    )
    return rows


if __name__ == "__main__":
    main()
