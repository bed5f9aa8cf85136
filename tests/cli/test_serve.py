"""`stillhouse serve`: bad settings are refused with one line per field and exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from stillhouse.cli.main import app


def serve(*args: str, **env: str | None) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["serve", *args], env={"STILLHOUSE_HOME": "/nonexistent", **env})
    return result.exit_code, result.stderr


def test_bad_environment_value_names_the_field() -> None:
    code, stderr = serve("prompts", STILLHOUSE_PROMPTS_LOG_LEVEL="loud", STILLHOUSE_PROMPTS_PORT="many")
    assert code == 2
    lines = stderr.splitlines()
    assert lines[0] == "invalid prompts settings (config file, STILLHOUSE_PROMPTS_* environment, flags):"
    assert any(line.startswith("  port: Input should be a valid integer") for line in lines)
    assert any(line.startswith("  log_level: Input should be 'debug', 'info'") for line in lines)
    assert "Traceback" not in stderr


def test_unknown_setting_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "teacher.yaml"
    config.write_text("port: 7000\nbatch_sise: 3\n")
    code, stderr = serve("teacher", "--config", str(config))
    assert code == 2
    assert "  batch_sise: Extra inputs are not permitted" in stderr.splitlines()


def test_config_file_that_is_not_yaml(tmp_path: Path) -> None:
    config = tmp_path / "storage.yaml"
    config.write_text("port: [1, 2\n")
    code, stderr = serve("storage", "--config", str(config))
    assert code == 2
    assert stderr.startswith(f"config file {config} is not valid YAML")


def test_missing_config_file(tmp_path: Path) -> None:
    code, stderr = serve("trainer", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2
    assert stderr.startswith(f"cannot read config file {tmp_path / 'missing.yaml'}")


def test_control_plane_without_a_token() -> None:
    code, stderr = serve("control-plane", "--port", "0")
    assert code == 2
    assert (
        "  set `api_tokens`, `api_token_file` or `principals_file`: the API refuses to run without a token"
        in stderr
    )


def test_control_plane_metrics_port_must_not_be_its_api_port() -> None:
    code, stderr = serve(
        "control-plane",
        "--port",
        "9100",
        "--metrics-port",
        "9100",
        STILLHOUSE_CONTROL_PLANE_API_TOKENS='["t"]',
    )
    assert code == 2
    assert "  metrics_port must differ from port (9100)" in stderr


def test_a_metrics_port_out_of_range_is_refused() -> None:
    code, stderr = serve("teacher", "--metrics-port", "70000")
    assert code == 2
    assert any(
        line.startswith("  metrics_port: Input should be less than or equal to 65535")
        for line in stderr.splitlines()
    )


def test_unknown_service() -> None:
    code, _ = serve("kitchen")
    assert code == 2


def test_a_service_without_a_service_token_refuses_to_start() -> None:
    code, stderr = serve("storage", "--port", "0", STILLHOUSE_STORAGE_SERVICE_TOKEN_FILE=None)
    assert code == 2
    assert stderr.startswith("cannot start the storage service: no service token: set service_token_file")
    assert "allow_unauthenticated_calls" in stderr


def test_an_unreadable_service_token_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "service-token"
    code, stderr = serve("teacher", "--port", "0", STILLHOUSE_TEACHER_SERVICE_TOKEN_FILE=str(missing))
    assert code == 2
    assert f"cannot read the service token file {missing}: No such file or directory" in stderr
