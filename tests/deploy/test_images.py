"""The container images: what their Dockerfiles promise (pinned bases, non-root final stages, no build
tools, the Ray version of the services), and the image's health check against real service processes,
in plaintext and over mutual TLS."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml
from tls_certificates import CLIENT_AUTH, SERVER_AUTH, issue, make_ca

from .conftest import CHART, REPO

DOCKER = REPO / "deploy" / "docker"
SERVICES_DOCKERFILE = DOCKER / "Dockerfile"
RAY_DOCKERFILE = DOCKER / "ray.Dockerfile"
HEALTHCHECK = DOCKER / "healthcheck.py"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions(dockerfile):
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def build_args(dockerfile: Path) -> dict[str, str]:
    return dict(
        args.split("=", 1) for name, args in instructions(dockerfile) if name == "ARG" and "=" in args
    )


def ray_pin() -> str:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in dependencies if d.startswith("ray[")]
    return ray.split("==")[1]


@pytest.mark.parametrize("dockerfile", [SERVICES_DOCKERFILE, RAY_DOCKERFILE], ids=lambda p: p.name)
def test_base_images_are_pinned_versions(dockerfile: Path) -> None:
    args = build_args(dockerfile)
    for stage in stages(dockerfile):
        image = stage[0][1].split()[0]
        image = args.get(image.strip("${}"), image) if image.startswith("$") else image
        if ":" not in image.split("/")[-1]:
            continue  # an earlier stage of this file
        tag = image.split(":")[-1]
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{dockerfile.name}: {image} is not pinned"


@pytest.mark.parametrize("dockerfile", [SERVICES_DOCKERFILE, RAY_DOCKERFILE], ids=lambda p: p.name)
def test_the_final_stage_runs_as_a_non_root_user_without_build_tools(dockerfile: Path) -> None:
    all_stages = stages(dockerfile)
    final = all_stages[-1]
    # The final stage may only re-tag an earlier one: then that one's instructions count.
    base = final[0][1].split()[0]
    named_stages = {stage[0][1].split()[-1]: stage for stage in all_stages if " AS " in stage[0][1].upper()}
    effective = named_stages.get(base, []) + final
    users = [args for name, args in effective if name == "USER"]
    assert users and not users[-1].startswith(("root", "0")), f"{dockerfile.name}: final user {users}"
    runs = " ".join(args for name, args in effective if name == "RUN")
    assert not re.search(r"\b(gcc|g\+\+|build-essential|make|clang)\b", runs), runs


def test_services_image_serves_a_named_service_with_a_health_check() -> None:
    effective = dict(instructions(SERVICES_DOCKERFILE))
    assert effective["ENTRYPOINT"] == '["stillhouse", "serve"]'
    assert "healthcheck.py" in effective["HEALTHCHECK"]
    runs = " ".join(args for name, args in instructions(SERVICES_DOCKERFILE) if name == "RUN")
    assert build_args(SERVICES_DOCKERFILE)["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert '--index-url "${TORCH_INDEX_URL}" torch==2.13.0' in runs


def test_ray_image_matches_the_ray_of_the_services_and_the_chart() -> None:
    version = ray_pin()
    assert build_args(RAY_DOCKERFILE)["RAY_IMAGE"].startswith(f"docker.io/rayproject/ray:{version}-py311")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["rayCluster"]["rayVersion"] == version
    assert f"ray.__version__ == '{version}'" in RAY_DOCKERFILE.read_text()


def test_dockerignore_admits_what_the_images_copy_and_nothing_else() -> None:
    rules = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert rules[0] == "*", "everything is excluded unless admitted"
    admitted = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = {
        source.removeprefix("./").rstrip("/")
        for dockerfile in (SERVICES_DOCKERFILE, RAY_DOCKERFILE)
        for name, args in instructions(dockerfile)
        if name == "COPY" and "--from=" not in args
        for source in args.split()[:-1]
    }
    for source in copied:
        assert any(source == path or source.startswith(path + "/") for path in admitted), source
    assert admitted == {"pyproject.toml", "README.md", "services", "deploy/docker"}


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def run_healthcheck(*command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_healthcheck_asks_a_grpc_service_for_its_health(
    processes, free_port, grpc_ready, wait_until, tmp_path
):
    port = free_port()
    command = ["stillhouse", "serve", "storage", "--host=0.0.0.0", f"--port={port}"]
    assert run_healthcheck(*command).returncode == 1
    processes.start(
        "storage",
        [
            sys.executable,
            "-m",
            "stillhouse.cli.main",
            "serve",
            "storage",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        {"STILLHOUSE_HOME": str(tmp_path)},
    )
    wait_until(lambda: grpc_ready(f"127.0.0.1:{port}"), 30, "the storage service")
    result = run_healthcheck(*command)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"storage at 127.0.0.1:{port}: healthy" in result.stdout


def test_healthcheck_asks_a_service_serving_mutual_tls_with_its_own_certificate(
    processes, free_port, wait_until, tmp_path
):
    """The chart's layout: the service's certificate names its Service, not the loopback address the
    check calls, and serves as the check's client certificate too."""
    ca = make_ca(tmp_path, "ca")
    names = ["demo-stillhouse-storage", "demo-stillhouse-storage.distil.svc"]
    shared = issue(
        tmp_path, "shared", ca, dns_names=names, ip_addresses=(), usages=(SERVER_AUTH, CLIENT_AUTH)
    )
    tls = {
        "STILLHOUSE_STORAGE_TLS_CERT_FILE": str(shared.cert),
        "STILLHOUSE_STORAGE_TLS_KEY_FILE": str(shared.key),
        "STILLHOUSE_STORAGE_TLS_CA_FILE": str(ca.cert),
    }
    port = free_port()
    command = ["stillhouse", "serve", "storage", "--host=0.0.0.0", f"--port={port}"]
    argv = [sys.executable, "-m", "stillhouse.cli.main", "serve", "storage", "--port", str(port)]
    processes.start("storage", argv, {"STILLHOUSE_HOME": str(tmp_path), **tls})
    wait_until(lambda: "serving" in processes.log("storage"), 30, "the storage service")

    server_name = {"STILLHOUSE_HEALTHCHECK_TLS_SERVER_NAME": "demo-stillhouse-storage"}
    result = run_healthcheck(*command, env={**tls, **server_name})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"storage at 127.0.0.1:{port}: healthy" in result.stdout
    # The name is checked: 127.0.0.1, or a name the certificate does not hold, fails the check.
    assert run_healthcheck(*command, env=tls).returncode == 1
    other_name = {"STILLHOUSE_HEALTHCHECK_TLS_SERVER_NAME": "demo-stillhouse-teacher"}
    assert run_healthcheck(*command, env={**tls, **other_name}).returncode == 1
    # Plaintext is refused.
    assert run_healthcheck(*command, env=server_name).returncode == 1


def test_healthcheck_reads_the_port_from_the_settings_and_asks_the_control_plane_over_http(
    processes, free_port, wait_until, tmp_path, monkeypatch
):
    port = free_port()
    env = {
        "STILLHOUSE_HOME": str(tmp_path),
        "STILLHOUSE_CONTROL_PLANE_PORT": str(port),
        "STILLHOUSE_CONTROL_PLANE_API_TOKENS": '["health-test-token"]',
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    processes.start(
        "control-plane", [sys.executable, "-m", "stillhouse.cli.main", "serve", "control-plane"], env
    )
    wait_until(lambda: answers(f"http://127.0.0.1:{port}/healthz"), 60, "the control plane")
    result = run_healthcheck("stillhouse", "serve", "control-plane")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"control-plane at 127.0.0.1:{port}: healthy" in result.stdout
    processes.stop("control-plane")
    assert run_healthcheck("stillhouse", "serve", "control-plane").returncode == 1
