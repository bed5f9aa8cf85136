"""The chart lints, renders, and every object it renders is valid for Kubernetes 1.29 and the newest
version kubernetes-validate knows, and the RayCluster for KubeRay's CRD."""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml
from kubernetes_validate.utils import all_versions, latest_version, major_minor, schema_contents

from .conftest import CHART, RELEASE, Helm, named, of_kind

KUBERNETES_VERSIONS = ["1.29.0", latest_version()]
SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def kubernetes_validator(version: str, kind: str, api_version: str) -> jsonschema.Draft202012Validator:
    """kubernetes_validate.validate(..., strict=True), with each schema loaded once instead of per object."""
    (schema_version,) = {v for v in all_versions() if major_minor(v) == major_minor(version)}
    folder = f"kubernetes-json-schema/v{schema_version}-local-strict"
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema = schema_contents(f"{folder}/{kind.lower()}-{group_version}.json", version)
    definitions = schema_contents(f"{folder}/_definitions.json", version)
    registry = referencing.Resource.from_contents(definitions) @ (
        referencing.Resource.from_contents(schema) @ referencing.Registry()
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


RAYCLUSTER_CRD = Path(__file__).parent / "crds" / "ray.io_rayclusters.yaml"
# Custom resources kubernetes-validate has no schema for: the RayCluster is checked against KubeRay's CRD
# below, the Prometheus Operator's objects structurally in test_monitoring.py.
CUSTOM_RESOURCE_GROUPS = ("ray.io/", "monitoring.coreos.com/")


def test_lint_strict(helm: Helm, values_set: tuple[str, Path | None]) -> None:
    name, values = values_set
    args = ["lint", "--strict", str(helm.chart), "--namespace", "distil"]
    result = helm.run(*args, *(["--values", str(values)] if values else []))
    assert result.returncode == 0, f"helm lint --strict ({name}) failed:\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_kubernetes(rendered: list[dict], kubernetes_version: str) -> None:
    problems = []
    for manifest in rendered:
        if manifest["apiVersion"].startswith(CUSTOM_RESOURCE_GROUPS):
            continue
        validator = kubernetes_validator(kubernetes_version, manifest["kind"], manifest["apiVersion"])
        for error in validator.iter_errors(manifest):
            path = "/".join(str(part) for part in error.absolute_path)
            problems.append(f"{manifest['kind']}/{manifest['metadata']['name']} {path}: {error.message}")
    assert not problems, "\n".join(problems)


def test_the_cached_validator_agrees_with_kubernetes_validate(render) -> None:
    """The check above loads each schema once; kubernetes_validate.validate itself must agree with it."""
    manifests = [m for m in render(None) if not m["apiVersion"].startswith(CUSTOM_RESOURCE_GROUPS)]
    deployment = next(m for m in manifests if m["kind"] == "Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    version = latest_version()
    for manifest in [*manifests, broken]:
        ours = kubernetes_validator(version, manifest["kind"], manifest["apiVersion"]).is_valid(manifest)
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
            theirs = True
        except kubernetes_validate.ValidationError:
            theirs = False
        assert ours == theirs == (manifest is not broken), manifest["metadata"]["name"]


@functools.cache
def raycluster_validator() -> jsonschema.Draft7Validator:
    crd = yaml.load(RAYCLUSTER_CRD.read_text(), Loader=SafeLoader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"])


def test_raycluster_matches_the_kuberay_crd(rendered: list[dict]) -> None:
    clusters = of_kind(rendered, "RayCluster")
    assert len(clusters) == 1
    assert clusters[0]["apiVersion"] == "ray.io/v1"
    errors = sorted(raycluster_validator().iter_errors(clusters[0]), key=str)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_crd_schema_catches_a_wrong_field(rendered: list[dict]) -> None:
    cluster = of_kind(rendered, "RayCluster")[0]
    broken = {**cluster, "spec": {**cluster["spec"], "enableInTreeAutoscaling": "yes"}}
    assert not raycluster_validator().is_valid(broken)


def test_chart_installs_without_dependencies() -> None:
    """The KubeRay operator is a prerequisite, not a dependency: a fresh checkout lints and renders
    with no `helm dependency build` and no network."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert "dependencies" not in chart
    assert not (CHART / "charts").exists() and not (CHART / "Chart.lock").exists()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert "kuberay-operator" not in values


def chart_tree_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(CHART.rglob("*")):
        digest.update(str(path.relative_to(CHART)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_lint_and_template_leave_the_chart_as_committed(helm: Helm) -> None:
    before = chart_tree_digest()
    assert helm.chart == CHART
    assert helm.run("lint", "--strict", str(CHART)).returncode == 0
    assert helm.template().returncode == 0
    assert chart_tree_digest() == before
    assert not helm.home.is_relative_to(CHART)


def test_names_are_prefixed_by_the_release(rendered: list[dict]) -> None:
    for manifest in rendered:
        assert manifest["metadata"]["name"].startswith(f"{RELEASE}-"), manifest["metadata"]["name"]


def test_trainer_submits_to_the_ray_head_service_kuberay_creates(rendered: list[dict]) -> None:
    cluster = of_kind(rendered, "RayCluster")[0]["metadata"]["name"]
    trainer = named(rendered, "Deployment", f"{RELEASE}-stillhouse-trainer")
    env = {e["name"]: e for e in trainer["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["STILLHOUSE_TRAINER_RAY_ADDRESS"]["value"] == f"http://{cluster}-head-svc.distil.svc:8265"
    token_file = Path(env["STILLHOUSE_TRAINER_RAY_AUTH_TOKEN_FILE"]["value"])
    pod = trainer["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == str(token_file.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == f"{RELEASE}-stillhouse-ray-auth"
    assert token_file.name == "auth_token"


def leaf_paths(values: object, prefix: str = "") -> set[str]:
    if isinstance(values, dict) and values:
        return {path for key, value in values.items() for path in leaf_paths(value, f"{prefix}{key}.")}
    return {prefix.rstrip(".")}


def test_readme_documents_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    table = readme[readme.index("\n## Values\n") : readme.index("\n## Values sets")]
    documented = set(re.findall(r"^\| `([^`]+)` \|", table, re.MULTILINE))
    leaves = leaf_paths(values)
    assert all(any(leaf == d or leaf.startswith(d + ".") for d in documented) for leaf in leaves), sorted(
        leaf for leaf in leaves if not any(leaf == d or leaf.startswith(d + ".") for d in documented)
    )
    assert documented <= {".".join(leaf.split(".")[:n]) for leaf in leaves for n in range(1, 8)}
