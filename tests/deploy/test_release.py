"""The release workflow publishes exactly the images the chart's defaults name: both tagged with
Chart.yaml's appVersion, built by the same `make images` target a private registry uses."""

from __future__ import annotations

import re
import shlex
import subprocess

import yaml

from .conftest import CHART, REPO, pod_templates

WORKFLOW = REPO / ".github" / "workflows" / "release.yaml"


def app_version() -> str:
    return str(yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"])


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def workflow_steps() -> list[dict]:
    (job,) = workflow()["jobs"].values()
    return job["steps"]


def make_images(registry: str, *extra: str) -> list[list[str]]:
    """The commands `make images` would run (make -n), split into words."""
    result = subprocess.run(
        ["make", "-n", "images", f"REGISTRY={registry}", "CONTAINER_ENGINE=docker", *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    return [command for command in commands if command and command[0] == "docker"]


def built_images(commands: list[list[str]]) -> set[tuple[str, str]]:
    """(Dockerfile, the image reference it is tagged with) of every build."""
    return {
        (command[command.index("-f") + 1], command[command.index("-t") + 1])
        for command in commands
        if command[1] == "build"
    }


def test_make_images_tags_every_image_with_the_app_version() -> None:
    version = app_version()
    commands = make_images("registry.example.com/ml")
    assert built_images(commands) == {
        ("deploy/docker/Dockerfile", f"registry.example.com/ml/stillhouse:{version}"),
        ("deploy/docker/Dockerfile", f"registry.example.com/ml/stillhouse:{version}-gpu"),
        ("deploy/docker/ray.Dockerfile", f"registry.example.com/ml/stillhouse-ray:{version}"),
    }
    # The GPU variant takes PyPI's torch (a CUDA build); the default one the CPU index's.
    (gpu_build,) = [c for c in commands if c[1] == "build" and c[-2].endswith("-gpu")]
    assert "TORCH_INDEX_URL=https://pypi.org/simple" in gpu_build
    assert not [c for c in commands if c[1] == "push"]
    pushed = {c[2] for c in make_images("registry.example.com/ml", "PUSH=1") if c[1] == "push"}
    assert pushed == {reference for _, reference in built_images(commands)}


def test_make_images_needs_a_registry() -> None:
    result = subprocess.run(
        ["make", "images", "CONTAINER_ENGINE=docker"], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0 and "REGISTRY" in result.stderr


def test_the_release_workflow_publishes_the_chart_default_images(render) -> None:
    steps = workflow_steps()
    registry = workflow()["env"]["REGISTRY"]
    (build,) = [step for step in steps if "make images" in step.get("run", "")]
    assert re.search(r'make images REGISTRY="\$REGISTRY" .*PUSH=1', build["run"]), build["run"]
    published = {reference for _, reference in built_images(make_images(registry))}
    # The chart's default references, as every pod of a default render uses them.
    images = {c["image"] for pod in pod_templates(render(None)).values() for c in pod["spec"]["containers"]}
    stillhouse_images = {image for image in images if "/stillhouse" in image}
    # Every default is published; the GPU variant is there for `teacher.image.tag`.
    assert stillhouse_images == {reference for reference in published if not reference.endswith("-gpu")}
    assert all(image.removesuffix("-gpu").endswith(f":{app_version()}") for image in published)


def test_the_release_workflow_checks_the_tag_against_the_app_version() -> None:
    document = workflow()
    triggers = document.get("on", document.get(True))
    assert triggers["push"]["tags"] == ["v*"]
    steps = workflow_steps()
    (read,) = [step for step in steps if step.get("id") == "chart"]
    assert "yq '.appVersion' deploy/helm/stillhouse/Chart.yaml" in read["run"]
    (check,) = [step for step in steps if "GITHUB_REF_NAME" in step.get("run", "")]
    assert check["env"]["APP_VERSION"] == "${{ steps.chart.outputs.app_version }}"
    assert '"v$APP_VERSION"' in check["run"]
