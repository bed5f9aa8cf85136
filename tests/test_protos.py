"""The committed gRPC stubs match the .proto contract, and the check that says so can fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def check(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(repo / "protos" / "generate.py"), "--check"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_committed_stubs_are_fresh() -> None:
    result = check(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The contract, its generator and the committed stubs, laid out as in the repository."""
    shutil.copytree(REPO / "protos" / "stillhouse", tmp_path / "protos" / "stillhouse")
    shutil.copy(REPO / "protos" / "generate.py", tmp_path / "protos" / "generate.py")
    for stub in (REPO / "services").glob("*/v1/*"):
        if stub.is_file():
            target = tmp_path / stub.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(stub, target)
    result = check(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp_path


def test_changed_contract_makes_its_stubs_stale(repo_copy: Path) -> None:
    proto = repo_copy / "protos" / "stillhouse" / "prompts" / "v1" / "prompts.proto"
    text = proto.read_text()
    message = "message GeneratePromptsRequest {\n"
    assert message in text
    proto.write_text(text.replace(message, message + "  string priority = 99;\n"))

    result = check(repo_copy)
    assert result.returncode == 1
    named = {line.strip() for line in result.stdout.splitlines()[1:]}
    assert "prompts/v1/prompts_pb2.py" in named
    assert "prompts/v1/prompts_pb2.pyi" in named
    assert not any(name.startswith(("common/", "teacher/")) for name in named), named


def test_stub_without_a_contract_is_stale(repo_copy: Path) -> None:
    orphan = repo_copy / "services" / "kitchen" / "v1" / "kitchen_pb2.py"
    orphan.parent.mkdir(parents=True)
    orphan.write_text("# generated from a .proto that no longer exists\n")

    result = check(repo_copy)
    assert result.returncode == 1
    assert "kitchen/v1/kitchen_pb2.py" in result.stdout
