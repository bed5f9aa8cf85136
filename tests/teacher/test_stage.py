"""The teacher stage through the real teacher service process, against the fake OpenAI-compatible server:
answers datasets, resume without a repeated call, budget stop, and faults recorded or reported."""

from __future__ import annotations

import contextlib
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import struct_pb2
from monitoring_queries import metric_samples
from service_token import authorized_channel
from teacher_runs import fake_teacher_spec

from stillhouse.common.datasets.manifest import Lineage
from stillhouse.common.datasets.records import PROMPTS_SCHEMA, prompt_id
from stillhouse.common.datasets.sparse_logprobs import SparseLogprobs
from stillhouse.common.datasets.store import DatasetReader, DatasetWriter
from stillhouse.common.objectstore.local_store import LocalObjectStore
from stillhouse.common.v1 import operations_pb2, operations_pb2_grpc
from stillhouse.teacher.v1 import teacher_pb2, teacher_pb2_grpc

State = operations_pb2.OperationState
JOB = "job-t1"


@dataclass
class TeacherService:
    address: str
    store: LocalObjectStore
    home: Path
    metrics_url: str

    def stubs(self, channel):
        return teacher_pb2_grpc.TeacherStub(channel), operations_pb2_grpc.OperationsStub(channel)


def write_prompts(store: LocalObjectStore, dataset_id: str, texts: list[str]) -> None:
    rows = []
    for text in texts:
        messages = [{"role": "user", "content": text}]
        rows.append({"prompt_id": prompt_id(messages), "messages": messages})
    lineage = Lineage(job_id=JOB, stage="prompts", input_ids=[], code_version="test")
    with DatasetWriter(store, dataset_id, PROMPTS_SCHEMA, lineage) as writer:
        writer.write_rows(rows)
        writer.commit()


# The fake server listens on loopback, which the teacher's egress policy refuses unless allow-listed.
LOOPBACK_EGRESS = '["127.0.0.0/8", "::1/128"]'


@pytest.fixture
def teacher_env() -> dict[str, str]:
    """More settings of the teacher service (STILLHOUSE_TEACHER_*); a test parametrizes it to set some."""
    return {}


@pytest.fixture
def teacher_service(request, processes, free_port, grpc_ready, wait_until, tmp_path, teacher_env):
    """The teacher service, allowed to reach loopback, or what an indirect parameter allows."""
    egress_allow = getattr(request, "param", LOOPBACK_EGRESS)
    home = tmp_path / "home"
    prices = tmp_path / "prices.yaml"
    prices.write_text("models:\n  fake-teacher: {prompt: 100.0, completion: 1000.0}\n")
    port, metrics_port = free_port(), free_port()

    def start() -> None:
        env = {
            "STILLHOUSE_HOME": str(home),
            "STILLHOUSE_TEACHER_PRICE_TABLE": str(prices),
            "STILLHOUSE_TEACHER_LOG_FORMAT": "console",
            "STILLHOUSE_TEACHER_EGRESS_ALLOW": egress_allow,
            "STILLHOUSE_TEACHER_API_KEY_DIR": str(home / "keys"),
            **teacher_env,
        }
        argv = [sys.executable, "-m", "stillhouse.cli.main", "serve", "teacher", "--port", str(port)]
        argv += ["--metrics-port", str(metrics_port)]
        processes.start("teacher", argv, env)
        wait_until(lambda: grpc_ready(f"127.0.0.1:{port}"), 30, "the teacher service")

    start()
    objects = LocalObjectStore(home / "objects", "stillhouse")
    service = TeacherService(f"127.0.0.1:{port}", objects, home, f"http://127.0.0.1:{metrics_port}/metrics")
    service.restart = start  # type: ignore[attr-defined]
    service.store.ensure_bucket()
    return service


def teacher_struct(base_url: str, **overrides) -> struct_pb2.Struct:
    spec = fake_teacher_spec(base_url, **overrides)
    value = struct_pb2.Struct()
    value.update(spec)
    return value


def answer_prompts(
    service: TeacherService,
    operation_id: str,
    teacher: struct_pb2.Struct,
    holdout: str = "",
    *,
    job: str = JOB,
    tenant: str = "team-a",
):
    with authorized_channel(service.address) as channel:
        stub, operations = service.stubs(channel)
        stub.AnswerPrompts(
            teacher_pb2.AnswerPromptsRequest(
                operation_id=operation_id,
                job_id=job,
                tenant=tenant,
                prompts=operations_pb2.DatasetRef(dataset_id=f"jobs/{job}/prompts/train"),
                holdout=operations_pb2.DatasetRef(dataset_id=holdout),
                teacher=teacher,
            )
        )
        final = None
        for operation in operations.WatchOperation(
            operations_pb2.WatchOperationRequest(operation_id=operation_id)
        ):
            final = operation
        return final


def result_of(operation) -> teacher_pb2.AnswerPromptsResult:
    assert operation.state == State.OPERATION_STATE_SUCCEEDED, operation.error.message
    result = teacher_pb2.AnswerPromptsResult()
    operation.result.Unpack(result)
    return result


def test_answers_every_prompt_in_order_with_logprobs(teacher_service, fake_openai):
    texts = [f"question number {i}" for i in range(30)]
    write_prompts(teacher_service.store, f"jobs/{JOB}/prompts/train", texts[:25])
    write_prompts(teacher_service.store, f"jobs/{JOB}/prompts/holdout", texts[25:])

    result = result_of(
        answer_prompts(
            teacher_service,
            "op-1",
            teacher_struct(fake_openai.base_url),
            holdout=f"jobs/{JOB}/prompts/holdout",
        )
    )

    answers = DatasetReader(teacher_service.store, result.answers.dataset_id).read_table()
    holdout = DatasetReader(teacher_service.store, result.holdout_answers.dataset_id).read_table()
    assert result.answers.dataset_id == f"jobs/{JOB}/teacher/answers" and result.answers.num_rows == 25
    assert [m[0]["content"] for m in answers.column("messages").to_pylist()] == texts[:25]
    assert holdout.num_rows == 5
    assert result.ledger.requests == 30 and result.ledger.cached_requests == 0
    assert result.ledger.completion_tokens == sum(answers.column("completion_tokens").to_pylist()) + sum(
        holdout.column("completion_tokens").to_pylist()
    )
    first = answers.slice(0, 1).to_pylist()[0]
    logprobs = SparseLogprobs.from_arrow(first, k=5)
    assert logprobs.topk_ids.shape == (first["completion_tokens"], 5)
    assert np.all(np.exp(logprobs.topk_logprobs.astype(np.float64)).sum(axis=1) <= 1.0 + 1e-3)
    assert fake_openai.calls()["by_status"] == {"200": 30}
    # How the ids were captured, per answer and in the ledger: the fake server sends ids and 5 each.
    assert set(answers.column("token_id_source").to_pylist()) == {"server"}
    assert set(answers.column("masked_alternatives").to_pylist()) == {0}
    assert result.ledger.alternative_slots == 5 * result.ledger.completion_tokens
    assert result.ledger.masked_alternatives == 0


def test_a_killed_stage_resumes_without_paying_twice(teacher_service, fake_openai, processes, wait_until):
    texts = [f"resume me {i}" for i in range(24)]
    write_prompts(teacher_service.store, f"jobs/{JOB}/prompts/train", texts)
    # The first 10 calls are answered; the rest hang, as a teacher does when the process dies mid-call.
    fake_openai.control(mode="ok", times=10)
    fake_openai.control(mode="slow", delay=600)
    with authorized_channel(teacher_service.address) as channel:
        stub, _ = teacher_service.stubs(channel)
        stub.AnswerPrompts(
            teacher_pb2.AnswerPromptsRequest(
                operation_id="op-resume",
                job_id=JOB,
                tenant="team-a",
                prompts=operations_pb2.DatasetRef(dataset_id=f"jobs/{JOB}/prompts/train"),
                teacher=teacher_struct(fake_openai.base_url),
            )
        )
    wait_until(lambda: fake_openai.calls()["by_status"].get("200") == 10, 30, "ten answers")
    time.sleep(1.0)  # the cache writes an answer within 50 ms of getting it
    first_run = fake_openai.calls()
    processes.kill("teacher")
    fake_openai.reset()  # forgets the hanging calls, which were never answered

    teacher_service.restart()
    result = result_of(answer_prompts(teacher_service, "op-resume", teacher_struct(fake_openai.base_url)))
    second_run = fake_openai.calls()

    answered_first = {prompt for prompt, count in first_run["by_prompt"].items()} - set(
        second_run["by_prompt"]
    )
    assert result.answers.num_rows == 24
    assert result.ledger.cached_requests == 10
    assert first_run["by_status"]["200"] + second_run["by_status"]["200"] == 24  # each prompt paid for once
    assert len(answered_first) == 10  # the ten answered before the kill were not asked again


def write_keys(service: TeacherService, **keys: str) -> None:
    folder = service.home / "keys"
    folder.mkdir(exist_ok=True)
    for name, key in keys.items():
        (folder / name.replace("_", "-")).write_text(key)


def test_answers_are_shared_within_a_tenant_and_key_only(teacher_service, fake_openai):
    write_keys(teacher_service, key_a="sk-key-a-0123456789", key_b="sk-key-b-0123456789")
    texts = [f"who pays for question {i}?" for i in range(4)]
    runs = [
        ("job-a1", "team-a", "key-a"),
        ("job-a2", "team-a", "key-a"),  # same tenant, same key: every answer from the cache
        ("job-b1", "team-b", "key-a"),  # another tenant, same key
        ("job-a3", "team-a", "key-b"),  # same tenant, another key
    ]
    paid = []
    for job, tenant, key in runs:
        write_prompts(teacher_service.store, f"jobs/{job}/prompts/train", texts)
        before = fake_openai.calls().get("completions", 0)
        teacher = teacher_struct(fake_openai.base_url, apiKeySecret=key)
        operation = answer_prompts(teacher_service, f"{job}.teacher.1", teacher, job=job, tenant=tenant)
        result = result_of(operation)
        paid.append((fake_openai.calls()["completions"] - before, result.ledger.cached_requests))

    assert paid == [(4, 0), (0, 4), (4, 0), (4, 0)]


def test_single_completions_are_cached_per_tenant(teacher_service, fake_openai):
    messages = [teacher_pb2.ChatMessage(role="user", content="write one question about tides")]
    teacher = teacher_struct(fake_openai.base_url)
    cached = []
    with authorized_channel(teacher_service.address) as channel:
        stub, _ = teacher_service.stubs(channel)
        for tenant in ("team-a", "team-a", "team-b"):
            request = teacher_pb2.CompleteRequest(
                job_id=JOB, tenant=tenant, messages=messages, teacher=teacher
            )
            cached.append(stub.Complete(request).ledger.cached_requests)

    assert cached == [0, 1, 0]
    assert fake_openai.calls()["completions"] == 2


@pytest.mark.parametrize(
    "teacher_env",
    [
        {
            "STILLHOUSE_TEACHER_CACHE_MAX_AGE_DAYS": str(1 / 86_400),
            "STILLHOUSE_TEACHER_CACHE_SWEEP_INTERVAL_SECONDS": "0.2",
        }
    ],
)
def test_an_expired_answer_is_asked_of_the_teacher_again(teacher_service, fake_openai, processes, wait_until):
    request = teacher_pb2.CompleteRequest(
        job_id=JOB,
        tenant="team-a",
        messages=[teacher_pb2.ChatMessage(role="user", content="how long do tides last?")],
        teacher=teacher_struct(fake_openai.base_url),
    )
    cache = teacher_service.home / "teacher-cache.db"
    with authorized_channel(teacher_service.address) as channel:
        stub, _ = teacher_service.stubs(channel)
        cached = [stub.Complete(request).ledger.cached_requests]
        # Answers expire one second after they are written, and the service looks every 0.2 s.
        wait_until(lambda: cached_answers(cache) == 0, 10, "the answer to expire")
        cached.append(stub.Complete(request).ledger.cached_requests)

    assert cached == [0, 0]
    assert fake_openai.calls()["completions"] == 2
    lines = processes.log("teacher").splitlines()
    assert any("teacher cache expired" in line and "removed=1" in line for line in lines)


def cached_answers(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as database:
        return database.execute("SELECT count(*) FROM teacher_answers").fetchone()[0]


def test_budget_stops_the_stage_cleanly_with_a_usable_partial_dataset(teacher_service, fake_openai):
    write_prompts(teacher_service.store, f"jobs/{JOB}/prompts/train", [f"pricey {i}" for i in range(40)])
    # 100 USD / 1M prompt tokens and 1000 USD / 1M completion tokens: one call costs at most ~0.02 USD.
    teacher = teacher_struct(fake_openai.base_url, budgetUSD=0.1, limits={"maxConcurrency": 2})

    result = result_of(answer_prompts(teacher_service, "op-budget", teacher))

    answered = DatasetReader(teacher_service.store, result.answers.dataset_id).read_table()
    assert result.stopped_reason.startswith("budget of 0.10 USD reached")
    assert 0 < result.answers.num_rows == answered.num_rows < 40
    assert result.ledger.cost_usd <= 0.1
    assert fake_openai.calls()["completions"] == answered.num_rows


@pytest.mark.parametrize("teacher_env", [{"STILLHOUSE_TEACHER_FANOUT__SHARD_ROWS": "100"}])
def test_a_stage_in_shards_answers_in_order_and_reports_its_whole_progress(teacher_service, fake_openai):
    texts = [f"in shards {i}" for i in range(250)]
    write_prompts(teacher_service.store, f"jobs/{JOB}/prompts/train", texts)
    fake_openai.control(mode="no_logprobs", times=3)

    operation = answer_prompts(teacher_service, "op-shards", teacher_struct(fake_openai.base_url))
    result = result_of(operation)

    answers = DatasetReader(teacher_service.store, result.answers.dataset_id)
    failures = DatasetReader(teacher_service.store, f"jobs/{JOB}/teacher/failures").read_table()
    failed = set(failures.column("prompt_id").to_pylist())
    table = answers.read_table(columns=["prompt_id", "messages"])
    assert len({shard.path.rsplit("-", 1)[1] for shard in answers.manifest.shards}) == 3  # 3 shards' writers
    assert [m[0]["content"] for m in table.column("messages").to_pylist()] == [
        text for text, row in zip(texts, prompt_rows(texts), strict=True) if row not in failed
    ]
    assert result.failed_prompts == 3 and result.answers.num_rows == 247
    assert operation.progress.done == operation.progress.total == 250
    assert operation.progress.metrics["teacher_calls"] == 247
    assert operation.progress.metrics["failed_prompts"] == 3


def prompt_rows(texts: list[str]) -> list[str]:
    return [prompt_id([{"role": "user", "content": text}]) for text in texts]


def test_unusable_answers_are_recorded_and_the_rest_done(teacher_service, fake_openai):
    write_prompts(teacher_service.store, f"jobs/{JOB}/prompts/train", [f"mixed {i}" for i in range(12)])
    fake_openai.control(mode="no_logprobs", times=3)

    result = result_of(answer_prompts(teacher_service, "op-mixed", teacher_struct(fake_openai.base_url)))

    failures = DatasetReader(teacher_service.store, f"jobs/{JOB}/teacher/failures").read_table().to_pylist()
    assert result.failed_prompts == 3 and result.answers.num_rows == 9
    assert {failure["kind"] for failure in failures} == {"missing_logprobs"}


def teacher_samples(service: TeacherService) -> dict[tuple[str, frozenset], float]:
    return metric_samples(httpx.get(service.metrics_url, timeout=10).text)


def test_metrics_count_answers_failures_tokens_dollars_and_budget_stops(teacher_service, fake_openai):
    metered = [f"metered {i}" for i in range(12)]
    for job in ("job-m1", "job-m2"):
        write_prompts(teacher_service.store, f"jobs/{job}/prompts/train", metered)
    write_prompts(teacher_service.store, "jobs/job-m3/prompts/train", [f"pricey {i}" for i in range(40)])
    fake_openai.control(mode="no_logprobs", times=3)
    teacher = teacher_struct(fake_openai.base_url)
    capped = teacher_struct(fake_openai.base_url, budgetUSD=0.1, limits={"maxConcurrency": 2})
    # The second job asks the first one's failed prompts again and takes its answers from the cache.
    ledgers = [
        result_of(answer_prompts(teacher_service, f"op-{job}", spec, job=job)).ledger
        for job, spec in [("job-m1", teacher), ("job-m2", teacher), ("job-m3", capped)]
    ]

    recorded = teacher_samples(teacher_service)

    def value(name: str, **labels: str) -> float:
        return recorded[(name, frozenset({"backend": "openai", "model": "fake-teacher", **labels}.items()))]

    answered = sum(ledger.requests - ledger.cached_requests for ledger in ledgers)
    assert value("stillhouse_teacher_requests_total", outcome="answered") == answered
    assert value("stillhouse_teacher_requests_total", outcome="cached") == 9
    assert value("stillhouse_teacher_requests_total", outcome="missing_logprobs") == 3
    for kind in ("prompt", "completion"):
        paid = sum(getattr(ledger, f"{kind}_tokens") for ledger in ledgers)
        assert value("stillhouse_teacher_tokens_total", kind=kind) == paid
    assert value("stillhouse_teacher_cost_usd_total") == pytest.approx(
        sum(ledger.cost_usd for ledger in ledgers)
    )
    assert value("stillhouse_teacher_request_seconds_count") == answered
    assert value("stillhouse_teacher_budget_stops_total") == 1
    # No stage runs now, so no budget is being spent.
    assert recorded[("stillhouse_teacher_budget_usd", frozenset())] == 0


@pytest.mark.parametrize(
    ("setup", "overrides", "code", "words"),
    [
        ({"api_key": "right-key"}, {}, "FAILED_PRECONDITION", "unauthenticated"),
        (
            {},
            {"apiKeySecret": "STILLHOUSE_TEST_ABSENT_KEY"},
            "FAILED_PRECONDITION",
            "STILLHOUSE_TEST_ABSENT_KEY",
        ),
        ({}, {"model": "no-such-model"}, "FAILED_PRECONDITION", "no-such-model"),
    ],
)
def test_a_teacher_that_cannot_answer_fails_the_stage_clearly(
    teacher_service, fake_openai, setup, overrides, code, words
):
    write_prompts(teacher_service.store, f"jobs/{JOB}/prompts/train", ["hello"])
    if setup:
        fake_openai.control(**setup)
    operation = answer_prompts(teacher_service, "op-fault", teacher_struct(fake_openai.base_url, **overrides))
    assert operation.state == State.OPERATION_STATE_FAILED
    assert operation.error.code == getattr(grpc.StatusCode, code).value[0]
    assert words in operation.error.message


@pytest.mark.parametrize("teacher_service", ["[]"], indirect=True)  # public addresses only
def test_a_teacher_outside_the_egress_policy_is_refused_before_any_request(teacher_service, fake_openai):
    write_prompts(teacher_service.store, f"jobs/{JOB}/prompts/train", ["hello"])
    refusals = [
        ("http://169.254.169.254/v1", "169.254.169.254 is a link-local address"),
        (fake_openai.base_url, "127.0.0.1 is a loopback address"),  # a server that would answer
    ]
    for number, (base_url, words) in enumerate(refusals):
        operation = answer_prompts(teacher_service, f"op-egress-{number}", teacher_struct(base_url))

        assert operation.state == State.OPERATION_STATE_FAILED
        assert operation.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert words in operation.error.message
        assert "STILLHOUSE_TEACHER_EGRESS_ALLOW" in operation.error.message

    with authorized_channel(teacher_service.address) as channel:
        stub, _ = teacher_service.stubs(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Complete(
                teacher_pb2.CompleteRequest(
                    teacher=teacher_struct("http://169.254.169.254/v1"),
                    messages=[teacher_pb2.ChatMessage(role="user", content="hello")],
                )
            )
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "169.254.169.254 is a link-local address" in refused.value.details()
    assert fake_openai.calls()["completions"] == 0


def test_an_invalid_teacher_spec_is_refused_naming_the_field(teacher_service, fake_openai):
    with authorized_channel(teacher_service.address) as channel:
        stub, _ = teacher_service.stubs(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.AnswerPrompts(
                teacher_pb2.AnswerPromptsRequest(
                    operation_id="op-bad",
                    job_id=JOB,
                    prompts=operations_pb2.DatasetRef(dataset_id=f"jobs/{JOB}/prompts/train"),
                    teacher=teacher_struct(fake_openai.base_url, topLogprobs=-1),
                )
            )
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.teacher.topLogprobs" in refused.value.details()


def test_estimate_prices_the_prompts_without_calling_the_teacher(teacher_service, fake_openai):
    texts = ["x" * 400, "y" * 40]  # about 100 and 10 tokens at 4 characters a token
    write_prompts(teacher_service.store, f"jobs/{JOB}/prompts/train", texts)
    with authorized_channel(teacher_service.address) as channel:
        stub, _ = teacher_service.stubs(channel)
        estimate = stub.EstimateCost(
            teacher_pb2.EstimateCostRequest(
                prompts=operations_pb2.DatasetRef(dataset_id=f"jobs/{JOB}/prompts/train"),
                teacher=teacher_struct(fake_openai.base_url),
            )
        )
    assert estimate.requests == 2
    assert 110 <= estimate.prompt_tokens <= 140  # the text plus the chat template's per-message overhead
    assert estimate.completion_tokens == 2 * 16  # an upper bound: every answer at maxTokens
    expected = (estimate.prompt_tokens * 100.0 + estimate.completion_tokens * 1000.0) / 1e6
    assert estimate.cost_usd == pytest.approx(expected)
    assert fake_openai.calls()["completions"] == 0
