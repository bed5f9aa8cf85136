"""The chart's control plane and four stage services, as `helm template` renders them, started for real
with `podman kube play` from the services image (marked `image`: `make test-image`).

The release points at what runs on this machine: PostgreSQL on 127.0.0.1:5432 (a fresh database) and
a SeaweedFS S3 API on a free loopback port, through the external database and object-store Secrets an
operator would create; every workload runs the image built from these sources (pullPolicy Never), the
chart's generated Secrets derive from an explicit seed, and the teacher has an API key in the chart's
own Secret. The Deployments, ConfigMaps and Secrets of those
five components are taken from the output, and its pre-install hook Jobs (schema migrations) run to
success first, as `helm install` runs them; other hooks, Services, NetworkPolicies, PDBs, HPA,
RayCluster and monitoring objects are not played: podman runs pods, nothing else.

The pods use the host's network: the podman of Debian bookworm (4.3, CNI) has no DNS on its networks,
and PostgreSQL and SeaweedFS listen on the host's loopback. The values give each process its own free
port so that nothing clashes, and the Service names the processes call (`<release>-teacher:<port>`,
...) resolve to 127.0.0.1 through podman's `base_hosts_file` setting; no manifest is edited for either.

What podman 4.3 cannot take as rendered, and how it is given instead, is in podman_kube.py: Secrets
become podman secrets (in the two formats its variables and volumes read), secret volumes get
`optional: false` (the Kubernetes default, without which podman crashes), the teacher's projected
API-key volume, which projects one whole Secret, becomes a secret volume of that Secret, a Job's pod
is played as a Pod (podman plays no Job), and the containers' `ports` lists are dropped (podman
refuses them on the host's network). Nothing else
changes: the pods keep the chart's security contexts, which the test checks in `podman inspect`, in
the kernel's view of each service process (/proc/1/status: the chart's non-root user, no capability,
not even in the bounding set, no privilege escalation, a seccomp filter) and by a refused write to
the root filesystem. Then it asks each process its health: `/healthz` and `/readyz` of the control
plane and an API call with the chart's generated token; the standard gRPC health check of each stage
service from the host, and the image's own health check (deploy/docker/healthcheck.py) in each
container; and each stage service's object store, as its settings open it in its container, takes an
object that the host then reads from SeaweedFS.
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
from .podman_kube import Pods, kube_played, pod_spec
from .services_image import podman

pytestmark = [pytest.mark.image, pytest.mark.timeout(3600)]

CONTROL_PLANE = "control-plane"
STAGE_SERVICES = ("prompts", "teacher", "storage", "trainer")
PLAYED_KINDS = ("Deployment", "ConfigMap", "Secret")
START_TIMEOUT_S = 420
TEACHER_API_KEY = "sk-test-" + "0" * 24
OBJECT_STORE_BUCKET = "stillhouse-kube-play"


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
        # Every generated Secret value (API and service tokens) derived from an explicit seed; a value
        # the seed does not cover fails the render rather than becoming random.
        "generatedSecrets": {"seed": secrets.token_hex(32), "withoutCluster": "fail"},
        "postgresql": {"enabled": False},
        "externalDatabase": {"existingSecret": f"{release}-database", "urlKey": "url"},
        "minio": {"enabled": False},
        "objectStore": {
            "bucket": OBJECT_STORE_BUCKET,
            "external": {
                "endpoint": s3.endpoint,
                "secure": False,
                "region": "us-east-1",
                "existingSecret": f"{release}-object-store",
                "accessKeyKey": "accessKey",
                "secretKeyKey": "secretKey",
            },
        },
        "rayCluster": {"enabled": False},
        "teacher": {"apiKeys": {"values": {"test-backend": TEACHER_API_KEY}}},
    }
    # No Ray cluster runs here: the trainer is only started, never asked to submit.
    values["trainer"] = {"externalRayAddress": f"http://127.0.0.1:{pick_free_port()}"}
    # One pod each: on the host's network a second replica would find its port taken.
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
        kind = manifest["kind"]
        if kind not in PLAYED_KINDS or hooks(manifest):
            continue
        if component(manifest) in (CONTROL_PLANE, *STAGE_SERVICES) or (
            kind == "Secret" and component(manifest) is None
        ):
            chosen[kind].append(manifest)
    return chosen


def hooks(manifest: Manifest) -> list[str]:
    annotations = manifest["metadata"].get("annotations") or {}
    return [hook.strip() for hook in annotations.get("helm.sh/hook", "").split(",") if hook.strip()]


def pre_install_jobs(rendered: list[Manifest]) -> list[Manifest]:
    """The Jobs `helm install` runs before the release's objects (such as schema migrations), in the
    order of their hook weights."""
    jobs = [m for m in rendered if m["kind"] == "Job" and "pre-install" in hooks(m)]
    return sorted(jobs, key=lambda job: int(job["metadata"]["annotations"].get("helm.sh/hook-weight", 0)))


def service_names(rendered: list[Manifest]) -> list[str]:
    return [
        manifest["metadata"]["name"]
        for manifest in rendered
        if manifest["kind"] == "Service" and component(manifest) in (CONTROL_PLANE, *STAGE_SERVICES)
    ]


def secret_value(secrets_: list[Manifest], name: str, key: str) -> str:
    (secret,) = [s for s in secrets_ if s["metadata"]["name"] == name]
    return base64.b64decode(secret["data"][key]).decode()


def api_token(deployment: Manifest, secrets_: list[Manifest]) -> str:
    """The first API token, found as the control plane finds it: through its token file's mount."""
    spec = pod_spec(deployment)
    (container,) = [c for c in spec["containers"] if c["name"] == CONTROL_PLANE]
    path = next(
        e["value"] for e in container["env"] if e["name"] == "STILLHOUSE_CONTROL_PLANE_API_TOKEN_FILE"
    )
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    key = path.removeprefix(mount["mountPath"] + "/")
    return secret_value(secrets_, volume["secret"]["secretName"], key).splitlines()[0]


def logs(pods: Pods) -> str:
    parts = []
    for containers in pods.values():
        for inspected in containers.values():
            tail = podman("logs", "--tail", "40", inspected["Id"], check=False)
            parts.append(f"--- {inspected['Name']}:\n{tail.stdout}{tail.stderr}")
    return "\n".join(parts)


def stopped(pods: Pods) -> list[str]:
    ids = [inspected["Id"] for containers in pods.values() for inspected in containers.values()]
    return [c["Name"] for c in json.loads(podman("inspect", *ids).stdout) if not c["State"]["Running"]]


def wait_healthy(check: Callable[[], bool], what: str, pods: Pods) -> None:
    """Wait for `check`, failing with the containers' logs when it times out or a container stops."""
    try:
        wait_until(lambda: check() or stopped(pods), START_TIMEOUT_S, what, interval=1)
    except TimedOut as timed_out:
        pytest.fail(f"{timed_out}\n{logs(pods)}")
    if exited := stopped(pods):
        pytest.fail(f"{', '.join(exited)} stopped while waiting for {what}\n{logs(pods)}")


# Run in a stage service's container: writes an object with the object store of the service's own
# settings (the chart's variables and Secrets), read back from the host.
OBJECT_STORE_ROUND_TRIP = """
import sys
sys.path.insert(0, "/opt/stillhouse")
from healthcheck import service_settings
from stillhouse.common.objectstore.open_store import open_object_store
store = open_object_store(service_settings(sys.argv[1], None).object_store)
store.ensure_bucket()
store.put_bytes(sys.argv[2], sys.argv[1].encode())
"""


def assert_reaches_the_object_store(service: str, container_id: str, s3: SeaweedFS, bucket: str) -> None:
    key = f"kube-play/{service}-{secrets.token_hex(4)}"
    wrote = podman("exec", container_id, "python", "-c", OBJECT_STORE_ROUND_TRIP, service, key, check=False)
    assert wrote.returncode == 0, f"{service} cannot write to the object store:\n{wrote.stderr[-3000:]}"
    response = s3.client().get_object(bucket, key)
    try:
        assert response.read() == service.encode()
    finally:
        response.close()
        response.release_conn()


def main_process_status(container_id: str) -> dict[str, str]:
    """/proc/1/status of the container (the service: the pod shares no PID namespace), by field."""
    status = podman("exec", container_id, "cat", "/proc/1/status").stdout
    return {name: value.strip() for name, _, value in (line.partition(":") for line in status.splitlines())}


def assert_runs_as_the_chart_says(deployment: Manifest, container: dict, inspected: dict) -> None:
    """The container's settings in podman, and what the kernel says of its main process."""
    context = {**pod_spec(deployment).get("securityContext", {}), **container.get("securityContext", {})}
    uid, gid, name = context["runAsUser"], context["runAsGroup"], inspected["Name"]
    assert uid != 0 and context["runAsNonRoot"] is True, name
    assert context["readOnlyRootFilesystem"] is True and context["capabilities"]["drop"] == ["ALL"], name
    assert inspected["Config"]["User"] == f"{uid}:{gid}", name
    assert inspected["HostConfig"]["ReadonlyRootfs"] is True, name
    assert not inspected["EffectiveCaps"], f"{name} keeps capabilities {inspected['EffectiveCaps']}"
    assert "no-new-privileges" in inspected["HostConfig"]["SecurityOpt"], name
    status = main_process_status(inspected["Id"])
    assert status["Uid"].split() == [str(uid)] * 4 and status["Gid"].split() == [str(gid)] * 4, status
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[capabilities], 16) == 0, f"{name}: {capabilities} {status[capabilities]}"
    assert status["NoNewPrivs"] == "1", name
    assert status["Seccomp"] == "2", f"{name} runs without a seccomp filter"
    unwritable = podman("exec", inspected["Id"], "touch", "/opt/stillhouse/written", check=False)
    assert unwritable.returncode != 0 and "Read-only file system" in unwritable.stderr, name


def test_the_charts_control_plane_and_stage_services_start_in_podman_and_answer_their_health_checks(
    helm: Helm, services_image: str, postgres_database_url: str, s3: SeaweedFS, tmp_path: Path
):
    release = f"stillhouse-{secrets.token_hex(3)}"  # names the pods, secrets and volumes: no clash
    ports = {name: pick_free_port() for name in (CONTROL_PLANE, *STAGE_SERVICES)}
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(release_values(services_image, release, ports, s3)))
    rendered = helm.render(values_file, release=release)
    objects = workload_objects(rendered)
    deployments = {component(d): d for d in objects["Deployment"]}
    assert sorted(deployments) == sorted([CONTROL_PLANE, *STAGE_SERVICES])
    chart_secrets = objects["Secret"]
    played_secrets = chart_secrets + operator_secrets(release, postgres_database_url, s3)
    with kube_played(
        list(deployments.values()),
        objects["ConfigMap"],
        played_secrets,
        service_names(rendered),
        tmp_path,
        jobs_first=pre_install_jobs(rendered),
    ) as pods:
        url = f"http://127.0.0.1:{ports[CONTROL_PLANE]}"
        wait_healthy(lambda: http_ok(f"{url}/healthz"), "the control plane's /healthz", pods)
        for service in STAGE_SERVICES:
            address = f"127.0.0.1:{ports[service]}"
            wait_healthy(lambda a=address: grpc_serving(a), f"{service}'s gRPC health", pods)

        wait_healthy(lambda: http_ok(f"{url}/readyz"), "the control plane's /readyz (PostgreSQL)", pods)
        token = api_token(deployments[CONTROL_PLANE], chart_secrets)
        listed = httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert listed.status_code == 200, listed.text
        for name, deployment in deployments.items():
            containers = pods[deployment["metadata"]["name"]]
            for container in pod_spec(deployment)["containers"]:
                assert_runs_as_the_chart_says(deployment, container, containers[container["name"]])
            # The image's own health check, as the probes of a TLS release run it.
            checked = podman(
                "exec", containers[name]["Id"], "python", "/opt/stillhouse/healthcheck.py", check=False
            )
            assert checked.returncode == 0, f"{name}: {checked.stdout}{checked.stderr}"
            if name in STAGE_SERVICES:
                assert_reaches_the_object_store(name, containers[name]["Id"], s3, OBJECT_STORE_BUCKET)
        assert not stopped(pods), logs(pods)
