"""Teacher API keys come from the key store only: a file of the key folder, or the prefixed environment
variable of the key's name. A spec's name reaches no other file and no other variable."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError

from stillhouse.common.jobspec import TeacherSpec
from stillhouse.common.operations import OperationError
from stillhouse.teacher.teachers import key_variable, resolve_api_key


def openai_teacher(secret: str) -> dict:
    return {"backend": "openai", "baseURL": "http://127.0.0.1:9/v1", "model": "m", "apiKeySecret": secret}


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    folder.mkdir()
    (folder / "deepseek").write_text("sk-from-file\n")
    return folder


def test_a_key_is_the_file_of_its_name_in_the_key_folder(key_dir: Path):
    assert resolve_api_key("deepseek", key_dir, environ={}) == "sk-from-file"
    assert resolve_api_key(None, key_dir, environ={}) is None


def test_without_the_file_the_key_is_the_prefixed_variable_of_its_name(key_dir: Path):
    assert key_variable("openai-prod.v2") == "STILLHOUSE_TEACHER_KEY_OPENAI_PROD_V2"
    environ = {"STILLHOUSE_TEACHER_KEY_OPENAI_PROD_V2": " sk-from-env "}
    assert resolve_api_key("openai-prod.v2", key_dir, environ) == "sk-from-env"
    assert resolve_api_key("openai-prod.v2", None, environ) == "sk-from-env"


@pytest.mark.parametrize("name", ["HOME", "PATH", "STILLHOUSE_CONTROL_PLANE_API_TOKEN_FILE", "deepseek"])
def test_no_other_environment_variable_is_ever_read(name: str, tmp_path: Path):
    environ = {name: "the platform's own secret"}
    with pytest.raises(OperationError) as caught:
        resolve_api_key(name, tmp_path, environ)
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert key_variable(name) in caught.value.message and str(tmp_path / name) in caught.value.message
    assert "the platform's own secret" not in caught.value.message


@pytest.mark.parametrize(
    "name", ["../api-token", "/etc/passwd", "a/b", ".hidden", "..", "", "x" * 64, "key\n", "k ey", "ключ"]
)
def test_a_name_that_is_not_a_plain_key_name_is_refused_in_the_spec_and_by_the_service(name: str, key_dir):
    (key_dir.parent / "api-token").write_text("the platform's API token")
    with pytest.raises(ValidationError, match="apiKeySecret"):
        TeacherSpec.model_validate(openai_teacher(name))
    with pytest.raises(OperationError) as caught:
        resolve_api_key(name, key_dir, environ=dict(os.environ))
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.teacher.apiKeySecret" in caught.value.message


def test_a_link_out_of_the_key_folder_is_not_followed(key_dir: Path):
    (key_dir.parent / "elsewhere").write_text("not a key")
    (key_dir / "escape").symlink_to(key_dir.parent / "elsewhere")
    with pytest.raises(OperationError, match="not found"):
        resolve_api_key("escape", key_dir, environ={})
    # A mounted Secret's files are links within the folder (Kubernetes' ..data): those are followed.
    (key_dir / "..data").mkdir()
    (key_dir / "..data" / "mounted").write_text("sk-mounted")
    (key_dir / "mounted").symlink_to(Path("..data") / "mounted")
    assert resolve_api_key("mounted", key_dir, environ={}) == "sk-mounted"


def test_valid_names_pass_the_spec():
    for name in ("deepseek", "OpenAI_prod", "a", "key.v2", "x" * 63):
        assert TeacherSpec.model_validate(openai_teacher(name)).api_key_secret == name
