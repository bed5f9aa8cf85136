"""Fixtures for prompts tests: the fake teacher service (fake_teacher.py) and the prompts service, each
a real process on a free port. Both are started once per test module, as tests/teacher/conftest.py
starts its fake server (a service process takes seconds to start); tests keep apart by job id."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from background import background_server
from google.protobuf import struct_pb2
from service_token import authorized_channel
from waiting import grpc_serving, pick_free_port

from stillhouse.common.objectstore.local_store import LocalObjectStore
from stillhouse.common.v1 import operations_pb2, operations_pb2_grpc
from stillhouse.prompts.v1 import prompts_pb2, prompts_pb2_grpc

FAKE_TEACHER = Path(__file__).with_name("fake_teacher.py")


@dataclass
class FakeTeacher:
    address: str
    calls_file: Path

    def calls(self, job_id: str) -> list[dict]:
        """The calls made for one job, in arrival order."""
        lines = self.calls_file.read_text().splitlines() if self.calls_file.exists() else []
        return [call for call in map(json.loads, lines) if call["job_id"] == job_id]


def fake_teacher_spec(model: str = "fake-teacher", **overrides) -> dict:
    """A `spec.teacher` the fake teacher answers (the model picks its behaviour); the URL is never called."""
    return {
        "backend": "openai",
        "baseURL": "http://127.0.0.1:9/v1",
        "model": model,
        "sampling": {"temperature": 0.7, "maxTokens": 128},
        **overrides,
    }


# Test modules cannot import this file, so its helpers come as fixtures.
@pytest.fixture
def teacher_spec():
    return fake_teacher_spec


def struct(value: dict) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


@dataclass
class PromptsService:
    address: str
    store: LocalObjectStore
    home: Path

    def generate(
        self,
        operation_id: str,
        prompts: dict,
        *,
        job_id: str,
        teacher: dict | None = None,
        evaluation: dict | None = None,
        wait_seconds: float = 120,
    ) -> operations_pb2.Operation:
        """Start GeneratePrompts and wait for its final state."""
        request = prompts_pb2.GeneratePromptsRequest(
            operation_id=operation_id,
            job_id=job_id,
            prompts=struct(prompts),
            teacher=struct(teacher) if teacher else None,
            evaluation=struct(evaluation) if evaluation else None,
        )
        with authorized_channel(self.address) as channel:
            prompts_pb2_grpc.PromptsStub(channel).GeneratePrompts(request)
            operations = operations_pb2_grpc.OperationsStub(channel)
            for _ in operations.WatchOperation(
                operations_pb2.WatchOperationRequest(operation_id=operation_id), timeout=wait_seconds
            ):
                pass
            # The watch can end on a snapshot taken just before the final state: read that state.
            return operations.GetOperation(operations_pb2.GetOperationRequest(operation_id=operation_id))

    @staticmethod
    def result(operation: operations_pb2.Operation) -> prompts_pb2.GeneratePromptsResult:
        assert operation.state == operations_pb2.OPERATION_STATE_SUCCEEDED, operation.error.message
        result = prompts_pb2.GeneratePromptsResult()
        operation.result.Unpack(result)
        return result


def prompts_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "stillhouse.cli.main", "serve", "prompts", "--port", str(port)]


def prompts_env(home: Path, teacher_address: str, input_root: Path) -> dict[str, str]:
    """`input_root`: the folder the tests' local prompt files lie in."""
    return {
        "STILLHOUSE_HOME": str(home),
        "STILLHOUSE_PROMPTS_TEACHER_ADDRESS": teacher_address,
        "STILLHOUSE_PROMPTS_LOG_FORMAT": "console",
        "STILLHOUSE_PROMPTS_INPUT_ROOTS": json.dumps([str(input_root)]),
    }


def started_service(home: Path, port: int) -> PromptsService:
    return PromptsService(f"127.0.0.1:{port}", LocalObjectStore(home / "objects", "stillhouse"), home)


@contextmanager
def shared_server(
    name: str, argv: list[str], env: dict[str, str], port: int, log_path: Path
) -> Iterator[str]:
    """A gRPC server process shared by the tests of a module (the `processes` fixture is per test)."""
    address = f"127.0.0.1:{port}"
    with background_server(name, argv, log_path, lambda: grpc_serving(address), env=env):
        yield address


@pytest.fixture(scope="module")
def fake_teacher(tmp_path_factory, service_token_file) -> Iterator[FakeTeacher]:
    folder, port = tmp_path_factory.mktemp("fake-teacher"), pick_free_port()
    argv = [
        sys.executable,
        str(FAKE_TEACHER),
        str(port),
        str(folder / "calls.jsonl"),
        str(service_token_file),
    ]
    with shared_server("the fake teacher", argv, {}, port, folder / "server.log") as address:
        yield FakeTeacher(address, folder / "calls.jsonl")


@pytest.fixture(scope="module")
def prompts_service(fake_teacher, tmp_path_factory) -> Iterator[PromptsService]:
    """The prompts service (`stillhouse serve prompts`), generating through the fake teacher."""
    folder, port = tmp_path_factory.mktemp("prompts-service"), pick_free_port()
    home, env = (
        folder / "home",
        prompts_env(folder / "home", fake_teacher.address, tmp_path_factory.getbasetemp()),
    )
    with shared_server("the prompts service", prompts_argv(port), env, port, folder / "server.log"):
        yield started_service(home, port)


@pytest.fixture
def prompts_service_at(processes, free_port, grpc_ready, wait_until, tmp_path):
    """Start a prompts service of the test's own, talking to the teacher service at an address."""

    def start(teacher_address: str, **settings: str) -> PromptsService:
        home, port = tmp_path / "home", free_port()
        env = {**prompts_env(home, teacher_address, tmp_path), **settings}
        processes.start("prompts", prompts_argv(port), env)
        wait_until(lambda: grpc_ready(f"127.0.0.1:{port}"), 60, "the prompts service")
        return started_service(home, port)

    return start
