"""Teacher HTTP benchmark: requests per second of the whole teacher stage against a local
OpenAI-compatible server, beside a plain asyncio + httpx client and distilabel's `OpenAILLM`, on the
same prompts at the same concurrency, in one run.

    python bench/teacher_http_bench.py [--prompts 5000] [--concurrency 64] [--rounds 2]
                                       [--distilabel-python PATH]

The server is the fake OpenAI-compatible server of the tests (`tests/teacher/fake_openai.py`, started
here as a subprocess): 64-token answers with the top-20 logprobs of every token, about 110 KB each.
Every contender sends the same request bodies (temperature 0.7, max_tokens 64, top_logprobs 20,
vLLM's `return_tokens_as_token_ids`) with at most `concurrency` requests in flight:

- stillhouse: `AnswerPromptsStage`, the full teacher stage, its shards in this process: prompts read from a
  Parquet dataset, cache lookups, `ResilientTeacher` (retries, breaker, concurrency slots) around
  `OpenAICompatibleBackend`, parsing to sparse logprobs, write-behind cache writes, the answers
  dataset written and committed. Each run gets a fresh SQLite cache, so every prompt reaches the
  server. Timed: `AnswerPromptsStage.run`, from reading the prompts to the committed dataset.
- httpx: what a careful hand-written client does: one `httpx.AsyncClient` with `concurrency`
  pooled connections, a semaphore, `response.json()`, and the text, finish reason and each token's
  top-k (token, logprob) pairs pulled out into lists; nothing stored.
- distilabel: `OpenAILLM.agenerate` of distilabel 1.5.3 under a semaphore, in a subprocess run by the
  python of a separate virtual environment (distilabel's pins do not fit the project's), set with
  --distilabel-python; timed inside that process around the requests, so its start-up is not counted.

Method: `rounds` rounds; each round runs every contender once, and the order reverses from one
round to the next (A B C, then C B A, ...) so that a noisy machine slows every side alike. Each
contender's figure is its best round (noise on a shared machine only ever slows a run down).
`run()` returns one dict per result row (metric, stillhouse, baseline, ratio, target, pass);
`main()` runs it and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import structlog
from _table import print_grid, verdict

from stillhouse.common.datasets.manifest import Lineage
from stillhouse.common.datasets.records import PROMPTS_SCHEMA, prompt_id
from stillhouse.common.datasets.store import DatasetReader, DatasetWriter
from stillhouse.common.fanout.settings import FanoutSettings
from stillhouse.common.jobspec import TeacherSpec
from stillhouse.common.objectstore.local_store import LocalObjectStore
from stillhouse.teacher.backends import openai_wire
from stillhouse.teacher.backends.openai_http import OpenAICompatibleBackend
from stillhouse.teacher.cache import TeacherCache
from stillhouse.teacher.ledger import PriceTable
from stillhouse.teacher.resilience import ResilientTeacher
from stillhouse.teacher.shards import ShardAnswerer, call_for
from stillhouse.teacher.stage import AnswerPromptsStage

FAKE_OPENAI = Path(__file__).resolve().parents[1] / "tests" / "teacher" / "fake_openai.py"
MODEL = "fake-teacher"
TOP_K = 20
MAX_TOKENS = 64
TEMPERATURE = 0.7
DISTILABEL_VERSION = "1.5.3"
DEFAULT_DISTILABEL_PYTHON = Path("/tmp/distilabel-venv/bin/python")
HTTPX_TARGET = 0.9
DISTILABEL_TARGET = 1.5
START_TIMEOUT_S = 30
# distilabel itself runs for minutes at its pace; this only stops a hung one.
DISTILABEL_TIMEOUT_S = 900

TOPICS = [
    "why the sky is blue",
    "how a compiler turns source code into machine code",
    "what a prime number is",
    "how vaccines train the immune system",
    "the difference between weather and climate",
    "how a hash table finds a key",
    "why bread rises",
    "what inflation does to savings",
    "how tides follow the moon",
    "what a neural network learns",
    "how to boil an egg",
    "why cats purr",
]

# Run by the distilabel environment's python: argv is base URL, concurrency, and a JSON file with the
# model, the generation arguments and the conversations. Prints one JSON line: seconds, CPU seconds,
# answer texts (None for a failed call) and the first error.
DISTILABEL_DRIVER = """
import asyncio, json, sys, time, warnings
warnings.filterwarnings("ignore")
from distilabel.models.llms import OpenAILLM

base_url, concurrency, job_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(job_path) as job_file:
    job = json.load(job_file)
llm = OpenAILLM(model=job["model"], base_url=base_url, api_key="unused", max_retries=0, timeout=120)
llm.load()

async def main():
    slots = asyncio.Semaphore(concurrency)

    async def one(messages):
        async with slots:
            output = await llm.agenerate(input=messages, **job["generation"])
            return output["generations"][0]

    started, cpu_started = time.perf_counter(), time.process_time()
    outcomes = await asyncio.gather(*(one(m) for m in job["messages"]), return_exceptions=True)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    errors = [repr(o) for o in outcomes if isinstance(o, BaseException)]
    texts = [None if isinstance(o, BaseException) else o for o in outcomes]
    first_error = errors[0] if errors else None
    return {"seconds": seconds, "cpu_seconds": cpu, "texts": texts, "first_error": first_error}

print(json.dumps(asyncio.run(main())))
"""


@dataclass
class Contender:
    name: str
    runs: list[float] = field(default_factory=list)  # requests per second, in run order
    cpu_ms: list[float] = field(default_factory=list)  # client CPU milliseconds per request
    texts: list[str | None] = field(default_factory=list)  # answers of the last run, in prompt order
    missing: str = ""  # why the contender could not run, if it could not

    @property
    def best(self) -> float:
        return max(self.runs)


class NoProgress:
    def update(self, **_: Any) -> None:
        pass


# --- the server and the prompts -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def fake_openai(log_path: Path, latency_ms: float = 0.0) -> Iterator[str]:
    """The fake OpenAI-compatible server on a free loopback port until the block ends, taking
    `latency_ms` more over each answer; yields its API root (``http://127.0.0.1:PORT/v1``)."""
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                str(FAKE_OPENAI),
                str(port),
                "--model",
                MODEL,
                "--answer-tokens",
                str(MAX_TOKENS),
                "--latency-ms",
                str(latency_ms),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not _answers(base_url):
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(
                        f"the fake OpenAI server did not start (exit {process.poll()}):\n{tail}"
                    )
                time.sleep(0.1)
            yield base_url
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _answers(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/models", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def conversations(count: int) -> list[list[dict[str, str]]]:
    """`count` distinct one-turn conversations."""
    return [
        [{"role": "user", "content": f"Question {i}: in two sentences, explain {TOPICS[i % len(TOPICS)]}."}]
        for i in range(count)
    ]


def write_prompts(store: LocalObjectStore, dataset_id: str, messages: list[list[dict[str, str]]]) -> None:
    lineage = Lineage(job_id="bench", stage="prompts", input_ids=[], code_version="")
    with DatasetWriter(store, dataset_id, PROMPTS_SCHEMA, lineage) as writer:
        writer.write_rows([{"prompt_id": prompt_id(m), "messages": m} for m in messages])
        writer.commit()


def teacher_spec(base_url: str, concurrency: int) -> TeacherSpec:
    return TeacherSpec.model_validate(
        {
            "backend": "openai",
            "baseURL": base_url,
            "model": MODEL,
            "topLogprobs": TOP_K,
            "sampling": {"maxTokens": MAX_TOKENS, "temperature": TEMPERATURE},
            "limits": {"maxConcurrency": concurrency},
        }
    )


# --- the contenders -------------------------------------------------------------------------------


@dataclass
class OneTeacher:
    """The teacher source of the stage's shards: always this teacher."""

    teacher: ResilientTeacher

    async def get(self, spec: TeacherSpec) -> ResilientTeacher:
        return self.teacher


async def stillhouse_run(
    spec: TeacherSpec, store: LocalObjectStore, prompts_id: str, home: Path, run_name: str
) -> tuple[float, float, list[str]]:
    """(seconds, CPU seconds, answer texts) of one teacher stage over the prompts, on a fresh cache."""
    cache = await TeacherCache.open(f"sqlite:///{home / f'cache-{run_name}.db'}")
    backend = OpenAICompatibleBackend(
        spec.base_url or "",
        None,
        max_connections=spec.limits.max_concurrency,
        timeout_seconds=spec.limits.timeout_seconds,
    )
    teacher = ResilientTeacher(backend, spec.limits, key=f"{spec.base_url}|{spec.model}")
    stage = AnswerPromptsStage(
        store=store,
        spec=spec,
        job_id=run_name,
        scope="",
        fanout=FanoutSettings(),
        progress=NoProgress(),  # type: ignore[arg-type]
    )
    shards = ShardAnswerer(store, cache, OneTeacher(teacher), PriceTable({}))
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        result = await stage.run(run_name, prompts_id, "", shards)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        await teacher.aclose()
        await cache.close()
    if result.failed_prompts:
        raise RuntimeError(f"the teacher stage failed {result.failed_prompts} prompts")
    answers = DatasetReader(store, result.answers.dataset_id).read_table(columns=["response"])
    return seconds, cpu, answers.column("response").to_pylist()


def _read_answer(document: dict[str, Any]) -> tuple[str, str, list[str], list[list[tuple[str, float]]]]:
    choice = document["choices"][0]
    content = choice["logprobs"]["content"]
    return (
        choice["message"]["content"],
        choice["finish_reason"],
        [position["token"] for position in content],
        [[(entry["token"], entry["logprob"]) for entry in position["top_logprobs"]] for position in content],
    )


async def httpx_run(
    url: str, bodies: list[dict[str, Any]], concurrency: int
) -> tuple[float, float, list[str]]:
    """(seconds, CPU seconds, answer texts) of a plain asyncio + httpx client over the same bodies."""
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0, pool=None)) as client:

        async def one(body: dict[str, Any]) -> tuple[str, str, list[str], list[list[tuple[str, float]]]]:
            async with slots:
                response = await client.post(url, json=body)
                response.raise_for_status()
                return _read_answer(response.json())

        started, cpu_started = time.perf_counter(), time.process_time()
        answers = await asyncio.gather(*(one(body) for body in bodies))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return seconds, cpu, [answer[0] for answer in answers]


def distilabel_run(
    python: Path, base_url: str, messages: list[list[dict[str, str]]], concurrency: int, home: Path
) -> tuple[float, float, list[str | None]]:
    """(seconds, CPU seconds, answer texts) of distilabel's `OpenAILLM.agenerate` in its own process.
    RuntimeError with the reason when it cannot run."""
    job = home / "distilabel-job.json"
    generation = {
        "max_new_tokens": MAX_TOKENS,
        "temperature": TEMPERATURE,
        "top_p": 1.0,
        "logprobs": True,
        "top_logprobs": TOP_K,
        "extra_body": {"return_tokens_as_token_ids": True},
    }
    job.write_text(json.dumps({"model": MODEL, "generation": generation, "messages": messages}))
    done = subprocess.run(
        [str(python), "-c", DISTILABEL_DRIVER, base_url, str(concurrency), str(job)],
        capture_output=True,
        text=True,
        timeout=DISTILABEL_TIMEOUT_S,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"distilabel exited with {done.returncode}: {last}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report["first_error"]:
        failed = sum(text is None for text in report["texts"])
        raise RuntimeError(
            f"{failed} of {len(messages)} distilabel calls failed, first: {report['first_error']}"
        )
    return report["seconds"], report["cpu_seconds"], report["texts"]


def distilabel_missing(python: Path) -> str:
    """Why distilabel cannot run from `python`, or "" when it can."""
    if not python.exists():
        return f"not installed: no python at {python} (pip install distilabel=={DISTILABEL_VERSION} there)"
    probe = subprocess.run(
        [str(python), "-W", "ignore", "-c", "import distilabel; print(distilabel.__version__)"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"not installed: importing distilabel with {python} fails: {last}"
    return ""


# --- the benchmark --------------------------------------------------------------------------------


async def _bench(prompts: int, concurrency: int, rounds: int, distilabel_python: Path) -> list[dict]:
    messages = conversations(prompts)
    contenders = {name: Contender(name) for name in ("stillhouse", "httpx", "distilabel")}
    contenders["distilabel"].missing = distilabel_missing(distilabel_python)
    with tempfile.TemporaryDirectory(prefix="teacher-http-bench-") as folder:
        home = Path(folder)
        store = LocalObjectStore(home / "objects", "bench")
        prompts_id = "bench/prompts/train"
        await asyncio.to_thread(write_prompts, store, prompts_id, messages)
        with fake_openai(home / "fake-openai.log") as base_url:
            spec = teacher_spec(base_url, concurrency)
            bodies = [
                openai_wire.chat_request(call_for(spec, m, scope=""), token_ids_from_server=True)
                for m in messages
            ]
            url = f"{base_url}/chat/completions"
            # Warm-up, not timed: first-call costs of both in-process clients and of the server.
            await asyncio.to_thread(write_prompts, store, "bench/prompts/warm-up", messages[:concurrency])
            await stillhouse_run(spec, store, "bench/prompts/warm-up", home, "warm-up")
            await httpx_run(url, bodies[:concurrency], concurrency)

            order = [name for name, contender in contenders.items() if not contender.missing]
            for round_index in range(rounds):
                for name in order if round_index % 2 == 0 else order[::-1]:
                    contender = contenders[name]
                    if name == "stillhouse":
                        outcome = await stillhouse_run(spec, store, prompts_id, home, f"run-{round_index}")
                    elif name == "httpx":
                        outcome = await httpx_run(url, bodies, concurrency)
                    else:
                        try:
                            outcome = await asyncio.to_thread(
                                distilabel_run, distilabel_python, base_url, messages, concurrency, home
                            )
                        except (RuntimeError, subprocess.TimeoutExpired) as error:
                            contender.missing = f"failed: {error}"
                            order.remove(name)
                            continue
                    seconds, cpu, contender.texts = outcome
                    contender.runs.append(prompts / seconds)
                    contender.cpu_ms.append(1000 * cpu / prompts)
    return _rows(contenders, prompts, concurrency, rounds)


def _rows(contenders: dict[str, Contender], prompts: int, concurrency: int, rounds: int) -> list[dict]:
    ours, plain, distilabel = contenders["stillhouse"], contenders["httpx"], contenders["distilabel"]
    setting = f"{prompts} prompts, concurrency {concurrency}, best of {rounds}"
    rows = [
        {
            "metric": f"requests/s vs asyncio + httpx ({setting})",
            "stillhouse": round(ours.best, 1),
            "baseline": round(plain.best, 1),
            "ratio": round(ours.best / plain.best, 2),
            "target": f">= {HTTPX_TARGET}x",
            "pass": ours.best / plain.best >= HTTPX_TARGET,
        }
    ]
    if distilabel.missing:
        rows.append(
            {
                "metric": f"requests/s vs distilabel {DISTILABEL_VERSION} OpenAILLM ({setting})",
                "stillhouse": round(ours.best, 1),
                "baseline": distilabel.missing,
                "ratio": "-",
                "target": f">= {DISTILABEL_TARGET}x",
                "pass": None,
            }
        )
    else:
        rows.append(
            {
                "metric": f"requests/s vs distilabel {DISTILABEL_VERSION} OpenAILLM ({setting})",
                "stillhouse": round(ours.best, 1),
                "baseline": round(distilabel.best, 1),
                "ratio": round(ours.best / distilabel.best, 2),
                "target": f">= {DISTILABEL_TARGET}x",
                "pass": ours.best / distilabel.best >= DISTILABEL_TARGET,
            }
        )
    for contender in (plain, distilabel):
        if contender.missing:
            continue
        same = sum(a == b for a, b in zip(ours.texts, contender.texts, strict=True))
        rows.append(_info(f"answers identical to {contender.name}'s", f"{same}/{prompts}", "-"))
    for contender in (plain, distilabel):
        if contender.missing:
            continue
        runs = ", ".join(f"{rate:.1f}" for rate in contender.runs)
        mine = ", ".join(f"{rate:.1f}" for rate in ours.runs)
        rows.append(_info(f"requests/s of each round, stillhouse vs {contender.name}", mine, runs))
    for contender in (plain, distilabel):
        if contender.missing:
            continue
        rows.append(
            _info(
                f"client CPU ms per request (median of rounds), stillhouse vs {contender.name}",
                round(sorted(ours.cpu_ms)[len(ours.cpu_ms) // 2], 2),
                round(sorted(contender.cpu_ms)[len(contender.cpu_ms) // 2], 2),
            )
        )
    return rows


def _info(metric: str, stillhouse: Any, baseline: Any) -> dict:
    return {
        "metric": metric,
        "stillhouse": stillhouse,
        "baseline": baseline,
        "ratio": "-",
        "target": "-",
        "pass": None,
    }


def run(
    prompts: int = 5000,
    concurrency: int = 64,
    rounds: int = 2,
    distilabel_python: Path = DEFAULT_DISTILABEL_PYTHON,
) -> list[dict]:
    # The stage logs a line per run; only warnings (retries, breaker) belong beside the table.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    return asyncio.run(_bench(prompts, concurrency, rounds, distilabel_python))


def print_table(results: list[dict]) -> None:
    """The contenders side by side (requests/s, ratio to httpx), then every result row."""
    versus_httpx, versus_distilabel = results[0], results[1]
    plain = versus_httpx["baseline"]
    contenders = [
        [
            "stillhouse teacher stage",
            versus_httpx["stillhouse"],
            versus_httpx["ratio"],
            f">= {HTTPX_TARGET}x",
        ],
        ["asyncio + httpx", plain, 1.0, "-"],
        [
            f"distilabel {DISTILABEL_VERSION} OpenAILLM",
            versus_distilabel["baseline"],
            "-"
            if isinstance(versus_distilabel["baseline"], str)
            else round(versus_distilabel["baseline"] / plain, 2),
            f"stillhouse >= {DISTILABEL_TARGET}x this",
        ],
    ]
    verdicts = [versus_httpx["pass"], None, versus_distilabel["pass"]]
    print_grid(
        ["contender", "requests/s", "ratio vs httpx", "target", "pass"],
        [[str(cell) for cell in row] + [verdict(v)] for row, v in zip(contenders, verdicts, strict=True)],
    )
    print()
    headers = ["metric", "stillhouse", "baseline", "ratio", "target", "pass"]
    print_grid(
        headers, [[str(row[name]) for name in headers[:-1]] + [verdict(row["pass"])] for row in results]
    )
    print()
    print(
        "stillhouse: AnswerPromptsStage (fresh SQLite cache, local Parquet store) over ResilientTeacher and "
        "OpenAICompatibleBackend. httpx: AsyncClient + semaphore + response.json(). distilabel: "
        "OpenAILLM.agenerate + semaphore in its own environment. Rounds alternate the order; each figure is "
        "the contender's best round."
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each contender, order alternating")
    parser.add_argument(
        "--distilabel-python",
        type=Path,
        default=DEFAULT_DISTILABEL_PYTHON,
        help=f"python of a virtual environment with distilabel=={DISTILABEL_VERSION} installed",
    )
    args = parser.parse_args(argv)
    results = run(args.prompts, args.concurrency, args.rounds, args.distilabel_python)
    print_table(results)
    return results


if __name__ == "__main__":
    main()
