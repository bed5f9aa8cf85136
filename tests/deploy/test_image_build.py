"""The services image, built and run for real with podman (marked `image`: `make test-image`).

The image is built offline from a bootstrapped Debian base (services_image.py). It then runs the
control plane the way the chart does (non-root, read-only root filesystem, no capabilities, the API
token from a mounted file, PostgreSQL) until `/healthz` answers, and the image's own health check passes
against it.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import httpx
import pytest
from background import stop_process
from waiting import http_ok, pick_free_port, wait_until

from .services_image import RUN_OPTIONS, SERVICE_UID, podman

pytestmark = [pytest.mark.image, pytest.mark.timeout(3600)]

TOKEN_DIR_IN_IMAGE = "/var/run/secrets/stillhouse/api"


def test_the_image_runs_as_the_service_user_with_the_health_check_of_its_probes(services_image: str):
    (image,) = json.loads(podman("image", "inspect", services_image).stdout)
    config = image["Config"]
    assert config["User"] == f"{SERVICE_UID}:{SERVICE_UID}"
    assert config["Entrypoint"] == ["stillhouse", "serve"]
    assert config["Cmd"] == ["control-plane"]
    # podman keeps a docker-format image's health check beside the OCI config, which has no field for it
    assert image["Healthcheck"]["Test"] == ["CMD", "python", "/opt/stillhouse/healthcheck.py"]
    # Only the runtime is in the final stage: no source tree and no compiler.
    listing = podman(
        "run", "--rm", *RUN_OPTIONS, "--network", "none", "--entrypoint", "sh", services_image, "-c",
        "ls /src 2>&1; command -v gcc cc || echo no-compiler",
    ).stdout  # fmt: skip
    assert "No such file or directory" in listing
    assert "no-compiler" in listing


def test_the_control_plane_starts_in_the_image_and_answers_healthz(
    services_image: str, postgres_database_url: str, tmp_path: Path
):
    port, token = pick_free_port(), secrets.token_urlsafe(16)
    token_dir = tmp_path / "api-token"
    token_dir.mkdir()
    (token_dir / "tokens").write_text(token + "\n")
    token_dir.chmod(0o755)
    (token_dir / "tokens").chmod(0o644)
    name = f"stillhouse-control-plane-{secrets.token_hex(4)}"
    env = {
        "STILLHOUSE_CONTROL_PLANE_HOST": "127.0.0.1",
        "STILLHOUSE_CONTROL_PLANE_PORT": str(port),
        "STILLHOUSE_CONTROL_PLANE_API_TOKEN_FILE": f"{TOKEN_DIR_IN_IMAGE}/tokens",
        "STILLHOUSE_CONTROL_PLANE_DATABASE_URL": postgres_database_url,
    }
    argv = [
        "podman", "run", "--name", name, "--rm", *RUN_OPTIONS,
        "--network", "host",  # PostgreSQL listens on the host's loopback
        "--read-only", "--tmpfs", "/tmp", "--tmpfs", "/home/stillhouse:mode=1777",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--volume", f"{token_dir}:{TOKEN_DIR_IN_IMAGE}:ro",
        *(arg for key, value in env.items() for arg in ("--env", f"{key}={value}")),
        services_image,
    ]  # fmt: skip
    log_path = tmp_path / "control-plane.log"
    with log_path.open("wb") as log:
        container = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: http_ok(f"{url}/healthz") or container.poll() is not None,
            180,
            "the control plane in the image",
        )
        assert container.poll() is None, log_path.read_text(errors="replace")
        assert http_ok(f"{url}/readyz"), "the job store in PostgreSQL is not ready"
        assert httpx.get(f"{url}/v1/jobs", timeout=5).status_code == 401
        listed = httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert listed.status_code == 200, listed.text
        assert listed.json()["jobs"] == []

        checked = podman("healthcheck", "run", name, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        whoami = podman("exec", name, "id", "-u").stdout.strip()
        assert whoami == str(SERVICE_UID)
    finally:
        podman("stop", "--time", "10", name, check=False)
        stop_process(container)
