"""The chart's control plane and four stage services, as `helm template` renders them, started for real
with `podman kube play` from the services image (marked `image`: `make test-image`).

The release points at what runs on this machine: PostgreSQL on 127.0.0.1:5432 (a fresh database) and
a SeaweedFS S3 API on a free loopback port, through the external database and object-store Secrets an
operator would create; every workload runs the image built from these sources (pullPolicy Never), and
the teacher has an API key in the chart's own Secret. The Deployments, ConfigMaps and Secrets of those
five components are taken from the output (hooks, Services, NetworkPolicies, PDBs, HPA, RayCluster and
monitoring objects are not played: podman runs pods, nothing else).

The pods use the host's network: the podman of Debian bookworm (4.3, CNI) has no DNS on its networks,
and PostgreSQL and SeaweedFS listen on the host's loopback. The values give each process its own free
port so that nothing clashes, and the Service names the processes call (`<release>-teacher:<port>`,
...) resolve to 127.0.0.1 through podman's `base_hosts_file` setting; no manifest is edited for either.

What podman 4.3 cannot take as rendered, and how it is given instead, is in podman_kube.py: Secrets
become podman secrets (in the two formats its variables and volumes read), secret volumes get
`optional: false` (the Kubernetes default, which podman crashes without), and the teacher's projected
API-key volume, which projects one whole Secret, becomes a secret volume of that Secret. Nothing else
changes: the pods keep the chart's security contexts, which the test checks with `podman inspect`
(non-root user, read-only root filesystem, no capabilities, no privilege escalation) before it asks
each process its health: `/healthz` and `/readyz` of the control plane, an authenticated API call with
the chart's generated token, and the standard gRPC health check of each stage service, from the host
and with the image's own health check (deploy/docker/healthcheck.py) inside each container.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from s3_server import SeaweedFS, seaweedfs_server
from waiting import TimedOut, grpc_serving, http_ok, pick_free_port, wait_until

from .conftest import Helm, Manifest
from .podman_kube import kube_played
from .services_image import podman

pytestmark = [pytest.mark.image, pytest.mark.timeout(3600)]

CONTROL_PLANE = "control-plane"
STAGE_SERVICES = ("prompts", "teacher", "storage", "trainer")
VALUES_KEYS = {CONTROL_PLANE: "controlPlane", **{service: service for service in STAGE_SERVICES}}
PLAYED_KINDS = ("Deployment", "ConfigMap", "Secret")
START_TIMEOUT_S = 420
TEACHER_API_KEY = "sk-test-" + "0" * 24


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def release_values(image: str, release: str, ports: dict[str, int], s3: SeaweedFS) -> dict:
    registry, _, reference = image.partition("/")
    repository, _, tag = reference.rpartition(":")
    values: dict = {
        "image": {"registry": registry, "repository": repository, "tag": tag, "pullPolicy": "Never"},
        "listenHost": "127.0.0.1",
        "postgresql": {"enabled": False},
        "externalDatabase": {"existingSecret": f"{release}-database", "urlKey": "url"},
        "minio": {"enabled": False},
        "objectStore": {
            "external": {
                "endpoint": s3.endpoint,
                "secure": False,
                "region": "us-east-1",
                "existingSecret": f"{release}-object-store",
                "accessKeyKey": "accessKey",
                "secretKeyKey": "secretKey",
            }
        },
        "rayCluster": {"enabled": False},
        "teacher": {"apiKeys": {"values": {"test-backend": TEACHER_API_KEY}}},
    }
    # No Ray cluster runs here: the trainer is only started, never asked to submit.
    values["trainer"] = {"externalRayAddress": f"http://127.0.0.1:{pick_free_port()}"}
    values["controlPlane"] = {"replicas": 1, "port": ports[CONTROL_PLANE]}
    for service in STAGE_SERVICES:
        values.setdefault(service, {}).update(replicas=1, port=ports[service], metricsPort=pick_free_port())
    return values


def operator_secrets(release: str, database_url: str, s3: SeaweedFS) -> list[Manifest]:
    """The Secrets the values name and the chart does not make: an operator creates them."""

    def secret(name: str, data: dict[str, str]) -> Manifest:
        encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
        return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": encoded}

    return [
        secret(f"{release}-database", {"url": database_url}),
        secret(f"{release}-object-store", {"accessKey": s3.access_key, "secretKey": s3.secret_key}),
    ]


def component(manifest: Manifest) -> str | None:
    return manifest["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def workload_objects(rendered: list[Manifest]) -> dict[str, list[Manifest]]:
    """The Deployments, ConfigMaps and Secrets of the control plane and the stage services, by kind
    (Secrets of no component, like the service token, included); no hook."""
    chosen: dict[str, list[Manifest]] = {kind: [] for kind in PLAYED_KINDS}
    for manifest in rendered:
        kind, annotations = manifest["kind"], manifest["metadata"].get("annotations") or {}
        if kind not in PLAYED_KINDS or "helm.sh/hook" in annotations:
            continue
        if component(manifest) in (CONTROL_PLANE, *STAGE_SERVICES) or (
            kind == "Secret" and component(manifest) is None
        ):
            chosen[kind].append(manifest)
    return chosen


def service_names(rendered: list[Manifest]) -> list[str]:
    return [
        manifest["metadata"]["name"]
        for manifest in rendered
        if manifest["kind"] == "Service" and component(manifest) in (CONTROL_PLANE, *STAGE_SERVICES)
    ]


def secret_value(secrets_: list[Manifest], name: str, key: str) -> str:
    (secret,) = [s for s in secrets_ if s["metadata"]["name"] == name]
    return base64.b64decode(secret["data"][key]).decode()


def logs(containers: dict[str, list[dict]]) -> str:
    parts = []
    for name, inspected in containers.items():
        for container in inspected:
            tail = podman("logs", "--tail", "40", container["Id"], check=False)
            parts.append(f"--- {name}:\n{tail.stdout}{tail.stderr}")
    return "\n".join(parts)


def stopped(containers: dict[str, list[dict]]) -> list[str]:
    ids = [container["Id"] for inspected in containers.values() for container in inspected]
    return [c["Name"] for c in json.loads(podman("inspect", *ids).stdout) if not c["State"]["Running"]]


def wait_healthy(check: Callable[[], bool], what: str, containers: dict[str, list[dict]]) -> None:
    """Wait for `check`, failing with the containers' logs when it times out or a container stops."""
    try:
        wait_until(lambda: check() or stopped(containers), START_TIMEOUT_S, what, interval=1)
    except TimedOut as timed_out:
        pytest.fail(f"{timed_out}\n{logs(containers)}")
    if exited := stopped(containers):
        pytest.fail(f"{', '.join(exited)} stopped while waiting for {what}\n{logs(containers)}")


def assert_runs_as_the_chart_says(deployment: Manifest, inspected: dict) -> None:
    pod = deployment["spec"]["template"]["spec"]
    uid, gid = pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
    assert uid != 0
    name = inspected["Name"]
    assert inspected["Config"]["User"] == f"{uid}:{gid}", name
    assert inspected["HostConfig"]["ReadonlyRootfs"] is True, name
    assert not inspected["EffectiveCaps"], f"{name} keeps capabilities {inspected['EffectiveCaps']}"
    assert "no-new-privileges" in inspected["HostConfig"]["SecurityOpt"], name
    assert podman("exec", inspected["Id"], "id", "-u").stdout.strip() == str(uid)
    unwritable = podman("exec", inspected["Id"], "touch", "/opt/stillhouse/written", check=False)
    assert unwritable.returncode != 0 and "Read-only file system" in unwritable.stderr, name


def test_the_charts_control_plane_and_stage_services_start_in_podman_and_answer_their_health_checks(
    helm: Helm, services_image: str, postgres_database_url: str, s3: SeaweedFS, tmp_path: Path
):
    release = f"stillhouse-{secrets.token_hex(3)}"  # names the pods, secrets and volumes: no clash
    ports = {name: pick_free_port() for name in VALUES_KEYS}
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(release_values(services_image, release, ports, s3)))
    rendered = helm.render(values_file, release=release)
    objects = workload_objects(rendered)
    deployments = objects["Deployment"]
    assert sorted(component(d) for d in deployments) == sorted([CONTROL_PLANE, *STAGE_SERVICES])
    chart_secrets = objects["Secret"]
    played_secrets = chart_secrets + operator_secrets(release, postgres_database_url, s3)
    with kube_played(
        deployments, objects["ConfigMap"], played_secrets, service_names(rendered), tmp_path
    ) as containers:
        url = f"http://127.0.0.1:{ports[CONTROL_PLANE]}"
        wait_healthy(lambda: http_ok(f"{url}/healthz"), "the control plane's /healthz", containers)
        for service in STAGE_SERVICES:
            address = f"127.0.0.1:{ports[service]}"
            wait_healthy(lambda a=address: grpc_serving(a), f"{service}'s gRPC health", containers)

        assert http_ok(f"{url}/readyz"), "the control plane is not ready (PostgreSQL)\n" + logs(containers)
        token = secret_value(chart_secrets, f"{release}-api-tokens", "tokens").splitlines()[0]
        listed = httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert listed.status_code == 200, listed.text
        for deployment in deployments:
            (inspected,) = containers[deployment["metadata"]["name"]]
            assert inspected["State"]["Running"], logs(containers)
            assert_runs_as_the_chart_says(deployment, inspected)
            checked = podman("exec", inspected["Id"], "python", "/opt/stillhouse/healthcheck.py", check=False)
            assert checked.returncode == 0, f"{component(deployment)}: {checked.stdout}{checked.stderr}"
