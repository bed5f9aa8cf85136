"""The Tiltfile evaluates (starlark-pyo3, Tilt's functions stubbed to record their calls), and what it
names exists: the chart and values, the Dockerfiles and their stages, the paths it syncs, the
workloads, images, ports and Services of the chart it installs, and the kind cluster it may talk to."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import starlark
import yaml

from .conftest import REPO, Helm, named, of_kind

TILTFILE = REPO / "Tiltfile"
# Tilt functions the Tiltfile may call; anything else is an undefined name and fails evaluation.
TILT_FUNCTIONS = [
    "allow_k8s_contexts",
    "docker_build",
    "fall_back_on",
    "filter_yaml",
    "helm",
    "k8s_kind",
    "k8s_resource",
    "k8s_yaml",
    "link",
    "local_resource",
    "port_forward",
    "run",
    "sync",
]
EXTENSIONS = {"ext://restart_process": ["docker_build_with_restart"]}


@dataclass
class TiltCalls:
    calls: list[tuple[str, tuple, dict]] = field(default_factory=list)

    def recorder(self, name: str):
        def record(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            if name == "helm":
                return "rendered-chart"
            if name == "filter_yaml":
                return ["matching"], "rest"
            return {"function": name, "args": list(args), **kwargs}

        return record

    def of(self, name: str) -> list[tuple[tuple, dict]]:
        return [(args, kwargs) for called, args, kwargs in self.calls if called == name]


@pytest.fixture(scope="module")
def tilt() -> TiltCalls:
    calls = TiltCalls()
    module = starlark.Module()
    for name in TILT_FUNCTIONS:
        module.add_callable(name, calls.recorder(name))

    def load_extension(path: str) -> starlark.FrozenModule:
        extension = starlark.Module()
        for name in EXTENSIONS[path]:
            extension.add_callable(name, calls.recorder(name))
        return extension.freeze()

    ast = starlark.parse("Tiltfile", TILTFILE.read_text(), starlark.Dialect.extended())
    starlark.eval(module, ast, starlark.Globals.standard(), starlark.FileLoader(load_extension))
    return calls


@pytest.fixture(scope="module")
def tilt_chart(tilt: TiltCalls, helm: Helm) -> list[dict]:
    """The chart as `tilt up` installs it: the Tiltfile's release, namespace and values."""
    ((chart,), options) = tilt.of("helm")[0]
    assert (REPO / chart).resolve() == (REPO / "deploy" / "helm" / "stillhouse").resolve()
    (values,) = options["values"]
    return helm.render(REPO / values, release=options["name"], namespace=options["namespace"])


def images_of(tilt: TiltCalls) -> dict[str, dict]:
    builds = tilt.of("docker_build") + tilt.of("docker_build_with_restart")
    return {args[0]: {"context": args[1], **options} for args, options in builds}


def test_tiltfile_installs_the_chart_once_without_its_test_pods(tilt: TiltCalls) -> None:
    assert len(tilt.of("helm")) == 1
    ((source,), options) = tilt.of("filter_yaml")[0]
    assert source == "rendered-chart" and options == {"kind": "Pod"}
    assert tilt.of("k8s_yaml") == [(("rest",), {})]


def test_tiltfile_talks_only_to_the_kind_cluster(tilt: TiltCalls) -> None:
    cluster = yaml.safe_load((REPO / "deploy" / "kind" / "cluster.yaml").read_text())
    assert tilt.of("allow_k8s_contexts") == [((f"kind-{cluster['name']}",), {})]
    for _, options in tilt.of("local_resource"):
        assert f"--context kind-{cluster['name']}" in options["serve_cmd"]


def test_every_image_the_chart_runs_is_built_by_tilt(tilt: TiltCalls, tilt_chart: list[dict]) -> None:
    built = set(images_of(tilt))
    used = set()
    for manifest in tilt_chart:
        for match in re.finditer(r"'image': '([^']+)'", str(manifest)):
            used.add(match[1].rsplit(":", 1)[0])
    assert used - {"quay.io/minio/minio", "docker.io/library/postgres"} == built


def test_images_build_from_existing_dockerfiles_and_stages(tilt: TiltCalls) -> None:
    for ref, build in images_of(tilt).items():
        dockerfile = REPO / build["dockerfile"]
        assert dockerfile.is_file(), ref
        stages = re.findall(r"^FROM \S+ AS (\S+)", dockerfile.read_text(), re.MULTILINE)
        if "target" in build:
            assert build["target"] in stages, ref
        for source in build["only"]:
            assert (REPO / source).exists(), source
        for arg in build.get("build_args", {}):
            assert re.search(rf"^ARG {arg}=", dockerfile.read_text(), re.MULTILINE), f"{ref}: no ARG {arg}"


def test_live_update_syncs_sources_into_the_installed_package(tilt: TiltCalls) -> None:
    builds = images_of(tilt)
    services = builds["localhost:5001/stillhouse"]
    assert services["entrypoint"] == ["stillhouse", "serve"]
    syncs = [step for step in services["live_update"] if step["function"] == "sync"]
    ((local, remote),) = [step["args"] for step in syncs]
    assert (REPO / local / "cli" / "main.py").is_file()
    dockerfile = (REPO / services["dockerfile"]).read_text()
    venv = re.search(r"python -m venv (\S+)", dockerfile)[1]
    python = re.search(r"python:(\d+\.\d+)", dockerfile)[1]
    assert remote == f"{venv}/lib/python{python}/site-packages/stillhouse"
    ray = builds["localhost:5001/stillhouse-ray"]
    ((local, remote),) = [step["args"] for step in ray["live_update"] if step["function"] == "sync"]
    assert remote.endswith("/python3.11/site-packages/stillhouse") and local == "services"


def test_resources_name_workloads_of_the_chart(tilt: TiltCalls, tilt_chart: list[dict]) -> None:
    workloads = {
        manifest["metadata"]["name"]
        for manifest in tilt_chart
        if manifest["kind"] in ("Deployment", "StatefulSet", "RayCluster")
    }
    named_resources = {args[0] for args, _ in tilt.of("k8s_resource")}
    assert named_resources == workloads
    for _, options in tilt.of("k8s_resource"):
        for dependency in options.get("resource_deps", []):
            assert dependency in workloads


def test_port_forwards_reach_the_api_and_the_minio_console(tilt: TiltCalls, tilt_chart: list[dict]) -> None:
    forwards = {
        args[0]: [(f["args"][0], f["args"][1]) for f in options.get("port_forwards", [])]
        for args, options in tilt.of("k8s_resource")
    }
    control_plane = named(tilt_chart, "Service", "stillhouse-control-plane")
    assert forwards["stillhouse-control-plane"] == [(8080, control_plane["spec"]["ports"][0]["port"])]
    minio = named(tilt_chart, "Service", "stillhouse-minio")
    console = next(port["port"] for port in minio["spec"]["ports"] if port["name"] == "console")
    assert forwards["stillhouse-minio"] == [(9001, console)]


def test_ray_dashboard_forward_uses_the_head_service_kuberay_creates(tilt: TiltCalls, tilt_chart) -> None:
    (cluster,) = of_kind(tilt_chart, "RayCluster")
    (_, options) = tilt.of("local_resource")[0]
    assert f"service/{cluster['metadata']['name']}-head-svc 8265:8265" in options["serve_cmd"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert 8265 in [port["containerPort"] for port in head["ports"]]


def test_raycluster_image_paths_point_at_its_images(tilt: TiltCalls, tilt_chart: list[dict]) -> None:
    ((kind,), options) = tilt.of("k8s_kind")[0]
    (cluster,) = of_kind(tilt_chart, kind)
    assert options["api_version"] == cluster["apiVersion"]
    for path in options["image_json_path"]:
        value: Any = cluster
        for part in re.findall(r"\.(\w+)(?:\[(\d+)\])?", path):
            value = value[part[0]]
            if part[1]:
                value = value[int(part[1])]
        assert value.startswith("localhost:5001/stillhouse-ray:"), path


def test_kind_up_installs_what_the_chart_needs() -> None:
    script = (REPO / "deploy" / "kind" / "up.sh").read_text()
    # The KubeRay operator is the chart's prerequisite, in the version its README names.
    readme = (REPO / "deploy" / "helm" / "stillhouse" / "README.md").read_text()
    (version,) = set(re.findall(r"kuberay/kuberay-operator --version (\S+)", readme))
    assert f"kuberay_version={version}" in script
    assert "helm dependency build" not in script
    assert Path(REPO / "deploy" / "kind" / "up.sh").stat().st_mode & 0o111
