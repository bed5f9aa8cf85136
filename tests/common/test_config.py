"""Settings: defaults < YAML file < environment < flags, and clear refusals of bad files and values."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from stillhouse.common.config import ConfigFileError
from stillhouse.control_plane.config import ControlPlaneSettings
from stillhouse.control_plane.principals import Principal, Role, TenantQuota
from stillhouse.teacher.config import TeacherSettings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in os.environ:
        if name.startswith("STILLHOUSE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("STILLHOUSE_HOME", str(tmp_path / "home"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults() -> None:
    settings = TeacherSettings.load()
    assert settings.port == 50052
    assert settings.host == "127.0.0.1"
    assert settings.log_level == "info"
    assert settings.metrics_port is None


def test_file_overrides_defaults(tmp_path: Path) -> None:
    config = write(tmp_path / "teacher.yaml", "port: 6000\nlog_level: debug\nmetrics_port: 9100\n")
    settings = TeacherSettings.load(config)
    assert (settings.port, settings.log_level, settings.metrics_port) == (6000, "debug", 9100)
    assert settings.host == "127.0.0.1"


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "teacher.yaml", "port: 6000\nlog_level: debug\n")
    monkeypatch.setenv("STILLHOUSE_TEACHER_PORT", "7000")
    settings = TeacherSettings.load(config)
    assert settings.port == 7000
    assert settings.log_level == "debug"


def test_flags_override_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "teacher.yaml", "port: 6000\nhost: 0.0.0.0\n")
    monkeypatch.setenv("STILLHOUSE_TEACHER_PORT", "7000")
    settings = TeacherSettings.load(config, port=8000)
    assert settings.port == 8000
    assert settings.host == "0.0.0.0"


def test_none_flags_are_not_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "teacher.yaml", "port: 6000\n")
    monkeypatch.setenv("STILLHOUSE_TEACHER_LOG_LEVEL", "warning")
    settings = TeacherSettings.load(config, port=None, log_level=None, metrics_port=None)
    assert settings.port == 6000
    assert settings.log_level == "warning"
    assert settings.metrics_port is None


def test_environment_of_another_service_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STILLHOUSE_PROMPTS_PORT", "7000")
    assert TeacherSettings.load().port == 50052


def test_empty_file_keeps_defaults(tmp_path: Path) -> None:
    assert TeacherSettings.load(write(tmp_path / "teacher.yaml", "")).port == 50052


def test_unknown_key_in_the_file_is_refused_by_name(tmp_path: Path) -> None:
    config = write(tmp_path / "teacher.yaml", "port: 6000\nbatch_sise: 3\n")
    with pytest.raises(ValidationError) as caught:
        TeacherSettings.load(config)
    errors = caught.value.errors()
    assert [(error["loc"], error["type"]) for error in errors] == [(("batch_sise",), "extra_forbidden")]


def test_bad_value_in_the_environment_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STILLHOUSE_TEACHER_LOG_LEVEL", "loud")
    with pytest.raises(ValidationError) as caught:
        TeacherSettings.load()
    assert [error["loc"] for error in caught.value.errors()] == [("log_level",)]


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("missing.yaml", None, "cannot read config file"),
        ("a-directory", "", "cannot read config file"),
        ("broken.yaml", "port: [1, 2\n", "is not valid YAML"),
        ("list.yaml", "- port\n- 6000\n", "must hold a mapping of setting names to values"),
        ("scalar.yaml", "6000\n", "must hold a mapping of setting names to values"),
    ],
)
def test_bad_file_is_refused_naming_it(tmp_path: Path, name: str, content: str | None, fragment: str) -> None:
    config = tmp_path / name
    if name == "a-directory":
        config.mkdir()
    elif content is not None:
        config.write_text(content)
    with pytest.raises(ConfigFileError) as caught:
        TeacherSettings.load(config)
    assert str(config) in str(caught.value)
    assert fragment in str(caught.value)


# --- the control plane --------------------------------------------------------------------------


def test_control_plane_refuses_to_run_without_a_token() -> None:
    with pytest.raises(ValidationError, match="the API refuses to run without a token"):
        ControlPlaneSettings.load()


def test_control_plane_service_address_from_nested_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STILLHOUSE_CONTROL_PLANE_API_TOKENS", '["t0ken"]')
    monkeypatch.setenv("STILLHOUSE_CONTROL_PLANE_SERVICES__TEACHER", "teacher.stillhouse.svc:50052")
    settings = ControlPlaneSettings.load()
    assert settings.services.teacher == "teacher.stillhouse.svc:50052"
    assert settings.services.prompts == "127.0.0.1:50051"
    assert settings.accepted_tokens() == ["t0ken"]


def test_control_plane_from_a_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(
        tmp_path / "control-plane.yaml",
        "port: 9000\napi_tokens: [t0ken]\nservices: {prompts: 'prompts:1', teacher: 'teacher:1'}\n",
    )
    monkeypatch.setenv("STILLHOUSE_CONTROL_PLANE_SERVICES__TEACHER", "teacher:2")
    settings = ControlPlaneSettings.load(config)
    assert settings.port == 9000
    assert settings.services.prompts == "prompts:1"
    assert settings.services.teacher == "teacher:2"
    assert settings.services.storage == "127.0.0.1:50053"


def test_control_plane_reads_tokens_from_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = write(tmp_path / "api-token", "first-token\n\n   \n  second-token  \n")
    monkeypatch.setenv("STILLHOUSE_CONTROL_PLANE_API_TOKEN_FILE", str(token_file))
    settings = ControlPlaneSettings.load()
    assert settings.accepted_tokens() == ["first-token", "second-token"]
    # Read on every call, not cached at start-up.
    token_file.write_text("third-token\n")
    assert settings.accepted_tokens() == ["third-token"]


def test_control_plane_principals_from_a_file_and_tokens_as_default_admins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = hashlib.sha256(b"alice-token-0123456789").hexdigest()
    principals = write(
        tmp_path / "principals.yaml",
        f"principals:\n"
        f"  - {{name: alice, tenant: team-a, role: user, tokenSha256: {digest}}}\n"
        f"  - {{name: ops@example.com, tenant: platform, role: admin, token: ops-token-0123456789}}\n"
        f"tenants:\n  team-a: {{maxConcurrentJobs: 3, maxTeacherSpendUsdPerDay: 25.5}}\n",
    )
    monkeypatch.setenv("STILLHOUSE_CONTROL_PLANE_PRINCIPALS_FILE", str(principals))
    monkeypatch.setenv("STILLHOUSE_CONTROL_PLANE_API_TOKENS", '["legacy-token"]')
    access = ControlPlaneSettings.load().access_control()

    assert access.authenticate("alice-token-0123456789") == Principal("alice", "team-a", Role.USER)
    assert access.authenticate("ops-token-0123456789") == Principal("ops@example.com", "platform", Role.ADMIN)
    legacy = access.authenticate("legacy-token")
    assert (legacy.tenant, legacy.role) == ("default", Role.ADMIN)
    assert "legacy" not in legacy.name
    assert access.authenticate(digest) is None and access.authenticate("") is None
    assert access.quota("team-a") == TenantQuota(max_concurrent_jobs=3, max_teacher_spend_usd_per_day=25.5)
    assert access.quota("platform") == TenantQuota()


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (
            "principals:\n  - {name: a, tenant: Team_A, role: root, token: short}\n",
            [
                "principals.0.tenant: a tenant is 1 to 63 lower-case letters",
                "principals.0.role: Input should be 'admin' or 'user'",
                "principals.0.token: a token must be at least 16 characters long",
            ],
        ),
        (
            "principals:\n  - {name: a, tenant: t, role: user}\n",
            ["principals.0: give exactly one of `token` and `tokenSha256`"],
        ),
        (
            "principals:\n  - {name: a, tenant: t, role: user, tokenSha256: ABC}\n",
            ["principals.0.tokenSha256: must be 64 lower-case hex digits"],
        ),
        (
            "principals:\n  - {name: a, tenant: t, role: user, token: same-token-0123456789}\n"
            "  - {name: a, tenant: u, role: user, token: other-token-0123456789}\n",
            ["principal names must be unique: a appear"],
        ),
        (
            "principals:\n  - {name: a, tenant: t, role: user, token: same-token-0123456789}\n"
            "  - {name: b, tenant: u, role: user, token: same-token-0123456789}\n",
            ["two principals have the same token"],
        ),
        (
            "principals:\n  - {name: a, tenant: t, role: user, token: a-token-0123456789}\n"
            "tenants: {t: {maxConcurrentJobs: 0, maxJobs: 1}}\n",
            ["tenants.t.maxConcurrentJobs: Input should be greater than or equal to 1", "tenants.t.maxJobs"],
        ),
        ("principals: [\n", ["is not valid YAML"]),
        ("principals: []\n", ["principals: List should have at least 1 item"]),
    ],
    ids=["fields", "no-token", "bad-digest", "names-twice", "token-twice", "quota", "yaml", "empty"],
)
def test_control_plane_refuses_a_bad_principals_file_naming_file_and_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str, fragments: list[str]
) -> None:
    principals = write(tmp_path / "principals.yaml", content)
    monkeypatch.setenv("STILLHOUSE_CONTROL_PLANE_PRINCIPALS_FILE", str(principals))
    with pytest.raises(ValidationError) as refused:
        ControlPlaneSettings.load()
    message = str(refused.value)
    assert str(principals) in message
    for fragment in fragments:
        assert fragment in message
    assert "0123456789" not in message  # no token, even a duplicated one, is quoted


def test_control_plane_names_a_missing_principals_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STILLHOUSE_CONTROL_PLANE_PRINCIPALS_FILE", str(tmp_path / "nowhere.yaml"))
    with pytest.raises(ValidationError, match=r"cannot read the principals file .*nowhere\.yaml"):
        ControlPlaneSettings.load()


def test_a_token_given_twice_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    principals = write(
        tmp_path / "principals.yaml",
        "principals:\n  - {name: a, tenant: t, role: user, token: shared-token-0123456789}\n",
    )
    monkeypatch.setenv("STILLHOUSE_CONTROL_PLANE_PRINCIPALS_FILE", str(principals))
    monkeypatch.setenv("STILLHOUSE_CONTROL_PLANE_API_TOKENS", '["shared-token-0123456789"]')
    with pytest.raises(ValueError, match="a token is configured twice"):
        ControlPlaneSettings.load().access_control()
