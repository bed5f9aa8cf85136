"""What the rendered manifests promise: resources, probes, non-root and read-only containers, the
network flows, Secrets kept out of plain text, GPU workers, autoscaling, disruption budgets, RBAC."""

from __future__ import annotations

import base64
import importlib.util
import ipaddress
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from stillhouse.teacher.config import TeacherSettings

from .conftest import (
    NAMESPACE,
    RELEASE,
    REPO,
    VALUES_SETS,
    component_of,
    internal_tls_enabled,
    named,
    of_kind,
    pod_templates,
)
from .network_model import OUTSIDE, Endpoint, NetworkModel

PREFIX = f"{RELEASE}-stillhouse"
STAGE_SERVICES = ["prompts", "teacher", "storage", "trainer"]
DEPLOYMENTS = ["control-plane", *STAGE_SERVICES]
RAY = ["ray-head", "ray-worker"]
HEALTHCHECK = REPO / "deploy" / "docker" / "healthcheck.py"


def containers(pod: dict) -> list[dict]:
    return pod["spec"].get("initContainers", []) + pod["spec"]["containers"]


def is_ray(name: str) -> bool:
    return name.startswith("RayCluster/")


def read_only_root(values_name: str) -> bool:
    return values_name != "kind-dev"


# --- containers -----------------------------------------------------------------------------------


def test_every_container_has_requests_and_a_memory_limit(rendered: list[dict]) -> None:
    pods = pod_templates(rendered)
    assert len(pods) >= 8
    for name, pod in pods.items():
        for container in containers(pod):
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{name}/{container['name']}"
            assert "memory" in resources.get("limits", {}), f"{name}/{container['name']}"


def test_every_long_running_container_has_probes(rendered: list[dict]) -> None:
    """Ray containers are left out: KubeRay adds its own probes to the Ray containers it runs; and pods
    that run to completion (Jobs, `helm test` pods)."""
    for name, pod in pod_templates(rendered).items():
        if name.startswith(("Pod/", "Job/")) or is_ray(name):
            continue
        for container in pod["spec"]["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                assert probe in container, f"{name}/{container['name']} has no {probe}"


def healthcheck_script() -> ModuleType:
    """deploy/docker/healthcheck.py, the image's health check, as a module."""
    spec = importlib.util.spec_from_file_location("healthcheck", HEALTHCHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Its dataclass looks its module up while being defined.
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_grpc_services_probe_their_grpc_health_and_the_control_plane_http(
    rendered: list[dict], values_set: tuple[str, Path | None]
) -> None:
    """Native gRPC probes, which speak plaintext only; under internal mutual TLS, the image's health
    check, which asks the same health service over TLS with the pod's certificate."""
    tls = internal_tls_enabled(values_set)
    healthcheck = healthcheck_script()
    for service in STAGE_SERVICES:
        deployment = named(rendered, "Deployment", f"{PREFIX}-{service}")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if not tls:
                assert container[probe]["grpc"] == {"port": port}
                continue
            command = container[probe]["exec"]["command"]
            assert command[:2] == ["python", "/opt/stillhouse/healthcheck.py"]
            target = healthcheck.target_of(command[2:])
            assert (target.service, target.host, target.port) == (service, "127.0.0.1", port)
            assert container[probe]["timeoutSeconds"] > healthcheck.TIMEOUT_SECONDS
        metrics_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
        assert f"--metrics-port={metrics_port}" in container["args"]
    control_plane = named(rendered, "Deployment", f"{PREFIX}-control-plane")
    (container,) = control_plane["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_every_pod_runs_as_non_root_without_privilege_escalation(
    rendered: list[dict], values_set: tuple[str, Path | None]
) -> None:
    for name, pod in pod_templates(rendered).items():
        pod_context = pod["spec"].get("securityContext", {})
        for container in containers(pod):
            context = {**pod_context, **container.get("securityContext", {})}
            where = f"{name}/{container['name']}"
            assert context.get("runAsNonRoot") is True, where
            assert context.get("runAsUser", 1) != 0, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            assert context.get("readOnlyRootFilesystem") is read_only_root(values_set[0]), where


def test_read_only_containers_get_writable_tmp(rendered: list[dict]) -> None:
    for name, pod in pod_templates(rendered).items():
        volumes = {volume["name"]: volume for volume in pod["spec"].get("volumes", [])}
        for container in pod["spec"]["containers"]:
            mounts = {mount["mountPath"]: mount["name"] for mount in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name}/{container['name']}"
            assert "emptyDir" in volumes[mounts["/tmp"]]
            if container["image"].split("/")[-1].startswith("stillhouse:"):
                assert "emptyDir" in volumes[mounts["/home/stillhouse"]], f"{name}: HOME must be writable"


def test_images_are_pinned(rendered: list[dict]) -> None:
    for name, pod in pod_templates(rendered).items():
        for container in containers(pod):
            image = container["image"]
            assert ":" in image.split("/")[-1] and not image.endswith(":latest"), f"{name}: {image}"


# --- wiring -----------------------------------------------------------------------------------------


def env_of(rendered: list[dict], component: str) -> dict[str, dict]:
    deployment = named(rendered, "Deployment", f"{PREFIX}-{component}")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {entry["name"]: entry for entry in container["env"]}


def test_control_plane_reaches_every_service_through_its_service(rendered: list[dict]) -> None:
    env = env_of(rendered, "control-plane")
    for service in STAGE_SERVICES:
        address = env[f"STILLHOUSE_CONTROL_PLANE_SERVICES__{service.upper()}"]["value"]
        host, port = address.rsplit(":", 1)
        kube_service = named(rendered, "Service", host)
        assert int(port) in [p["port"] for p in kube_service["spec"]["ports"]]
        deployment = named(rendered, "Deployment", host)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert kube_service["spec"]["selector"].items() <= labels.items()
    teacher = env["STILLHOUSE_CONTROL_PLANE_SERVICES__TEACHER"]["value"]
    assert env_of(rendered, "prompts")["STILLHOUSE_PROMPTS_TEACHER_ADDRESS"]["value"] == teacher


def test_every_service_selects_pods_and_targets_their_ports(rendered: list[dict]) -> None:
    pods = pod_templates(rendered)
    for service in of_kind(rendered, "Service"):
        selector = service["spec"]["selector"]
        selected = [pod for pod in pods.values() if selector.items() <= pod["metadata"]["labels"].items()]
        assert selected, f"Service {service['metadata']['name']} selects no pod"
        port_names = {p["name"] for pod in selected for c in pod["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{service['metadata']['name']}: {port}"


def test_teacher_mounts_api_key_secrets_as_files_named_for_job_specs(render) -> None:
    manifests = render(VALUES_SETS["gpu-workers-values"])
    teacher = named(manifests, "Deployment", f"{PREFIX}-teacher")["spec"]["template"]["spec"]
    (container,) = teacher["containers"]
    env = {entry["name"]: entry for entry in container["env"]}
    key_dir = env["STILLHOUSE_TEACHER_API_KEY_DIR"]["value"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == key_dir)
    volume = next(v for v in teacher["volumes"] if v["name"] == mount["name"])
    files = {
        (source["secret"]["name"], item["key"]): item["path"]
        for source in volume["projected"]["sources"]
        for item in source["secret"].get("items", [])
    }
    assert files == {("deepseek-api", "api-key"): "deepseek", ("openai-api", "api-key"): "openai"}


def control_plane_pod(manifests: list[dict]) -> dict:
    return named(manifests, "Deployment", f"{PREFIX}-control-plane")["spec"]["template"]


def mounted_secret_file(pod: dict, variable: str) -> tuple[str, str] | None:
    """(Secret name, key) of the file the control plane's `variable` names, or None without it."""
    (container,) = pod["spec"]["containers"]
    env = {entry["name"]: entry for entry in container["env"]}
    if variable not in env:
        return None
    path = Path(env[variable]["value"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    return volume["secret"]["secretName"], path.name


def test_the_principals_file_reaches_the_control_plane_from_a_secret(render) -> None:
    digest = "ab" * 32
    given = render(
        None,
        (
            "controlPlane.principals.file.principals[0].name=alice",
            "controlPlane.principals.file.principals[0].tenant=team-a",
            "controlPlane.principals.file.principals[0].role=user",
            f"controlPlane.principals.file.principals[0].tokenSha256={digest}",
            "controlPlane.principals.file.tenants.team-a.maxConcurrentJobs=4",
            "controlPlane.finishedJobMaxAgeHours=720",
        ),
    )
    existing = render(None, ("controlPlane.principals.existingSecret=our-principals",))
    variable = "STILLHOUSE_CONTROL_PLANE_PRINCIPALS_FILE"

    secret = named(given, "Secret", f"{PREFIX}-principals")
    assert mounted_secret_file(control_plane_pod(given), variable) == (
        f"{PREFIX}-principals",
        "principals.yaml",
    )
    assert yaml.safe_load(base64.b64decode(secret["data"]["principals.yaml"])) == {
        "principals": [{"name": "alice", "tenant": "team-a", "role": "user", "tokenSha256": digest}],
        "tenants": {"team-a": {"maxConcurrentJobs": 4}},
    }
    assert "checksum/principals" in control_plane_pod(given)["metadata"]["annotations"]
    env = {e["name"]: e for e in control_plane_pod(given)["spec"]["containers"][0]["env"]}
    assert env["STILLHOUSE_CONTROL_PLANE_FINISHED_JOB_MAX_AGE_HOURS"]["value"] == "720"
    assert mounted_secret_file(control_plane_pod(existing), variable) == ("our-principals", "principals.yaml")
    assert not [s for s in of_kind(existing, "Secret") if s["metadata"]["name"].endswith("-principals")]
    # By default there is no principals file: the API tokens are admins of the tenant `default`.
    assert mounted_secret_file(control_plane_pod(render(None)), variable) is None


def service_token_source(manifests: list[dict], deployment: str) -> tuple[str, str]:
    """(Secret name, key) of the file a Deployment's STILLHOUSE_*_SERVICE_TOKEN_FILE names."""
    pod = named(manifests, "Deployment", f"{PREFIX}-{deployment}")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    prefix = f"STILLHOUSE_{deployment.upper().replace('-', '_')}_"
    env = {entry["name"]: entry for entry in container["env"]}
    assert not any(name.endswith("_REFLECTION") for name in env), "reflection stays off on a cluster"
    token_file = Path(env[f"{prefix}SERVICE_TOKEN_FILE"]["value"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(token_file.parent))
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return volume["secret"]["secretName"], token_file.name


def test_every_stillhouse_process_reads_the_same_service_token(rendered: list[dict]) -> None:
    sources = {deployment: service_token_source(rendered, deployment) for deployment in DEPLOYMENTS}
    assert set(sources.values()) == {(f"{PREFIX}-service-token", "token")}
    secret = named(rendered, "Secret", f"{PREFIX}-service-token")
    assert len(base64.b64decode(secret["data"]["token"])) >= 32
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_an_existing_service_token_secret_replaces_the_generated_one(render) -> None:
    manifests = render(None, ("serviceToken.existingSecret=platform-token", "serviceToken.key=current"))
    assert {service_token_source(manifests, deployment) for deployment in DEPLOYMENTS} == {
        ("platform-token", "current")
    }
    assert not [s for s in of_kind(manifests, "Secret") if s["metadata"]["name"].endswith("service-token")]


TLS_SETTINGS = ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CA_FILE")


def tls_sources(
    manifests: list[dict], component: str, settings: str | None = None
) -> dict[str, tuple[str, str]]:
    """(Secret name, key) of the file each STILLHOUSE_<settings>_TLS_*_FILE of a component's pod names
    (settings: the component's own by default)."""
    (pod,) = [pod["spec"] for pod in pod_templates(manifests).values() if component_of(pod) == component]
    (container,) = pod["containers"]
    prefix = f"STILLHOUSE_{settings or component.upper().replace('-', '_')}_"
    env = {entry["name"]: entry for entry in container["env"]}
    sources = {}
    for setting in TLS_SETTINGS:
        path = Path(env[prefix + setting]["value"])
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent))
        assert mount["readOnly"] is True
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        sources[setting] = (volume["secret"]["secretName"], path.name)
    return sources


def test_internal_tls_gives_every_stillhouse_process_the_certificate_of_the_secret(render) -> None:
    manifests = render(None, ("internalTLS.enabled=true", "internalTLS.secretName=platform-tls"))
    expected = {
        "TLS_CERT_FILE": ("platform-tls", "tls.crt"),
        "TLS_KEY_FILE": ("platform-tls", "tls.key"),
        "TLS_CA_FILE": ("platform-tls", "ca.crt"),
    }
    for deployment in DEPLOYMENTS:
        assert tls_sources(manifests, deployment) == expected, deployment
    # The CPU workers' prompts shards call the teacher service as the prompts service does.
    assert tls_sources(manifests, "ray-cpu-worker", "PROMPTS") == expected
    for name, pod in pod_templates(manifests).items():
        if component_of(pod) not in [*DEPLOYMENTS, "ray-cpu-worker"]:
            secrets = [v["secret"]["secretName"] for v in pod["spec"].get("volumes", []) if "secret" in v]
            assert "platform-tls" not in secrets, f"{name} needs no certificate"
    # The probes' health check expects the service's certificate to hold the name its callers call.
    addresses = env_of(manifests, "control-plane")
    for service in STAGE_SERVICES:
        host = addresses[f"STILLHOUSE_CONTROL_PLANE_SERVICES__{service.upper()}"]["value"].rsplit(":", 1)[0]
        assert env_of(manifests, service)["STILLHOUSE_HEALTHCHECK_TLS_SERVER_NAME"]["value"] == host


def test_internal_tls_is_off_by_default(render) -> None:
    for name, pod in pod_templates(render(None)).items():
        assert "internal-tls" not in [volume["name"] for volume in pod["spec"].get("volumes", [])], name
        for container in containers(pod):
            names = [entry["name"] for entry in container.get("env", [])]
            assert not [n for n in names if "_TLS_" in n or "HEALTHCHECK" in n], f"{name}: {names}"
            probes = [
                container.get(probe, {}) for probe in ("startupProbe", "readinessProbe", "livenessProbe")
            ]
            commands = [" ".join(probe["exec"]["command"]) for probe in probes if "exec" in probe]
            assert not [command for command in commands if "healthcheck" in command], name


# --- network -----------------------------------------------------------------------------------------

EXPECTED_FLOWS = {
    ("control-plane", "prompts"),
    ("control-plane", "teacher"),
    ("control-plane", "storage"),
    ("control-plane", "trainer"),
    ("control-plane", "postgresql"),
    ("prompts", "teacher"),
    ("prompts", "minio"),
    ("teacher", "minio"),
    ("teacher", "postgresql"),
    ("storage", "minio"),
    ("trainer", "minio"),
    ("trainer", "ray-head"),
    ("ray-head", "ray-head"),
    ("ray-head", "ray-worker"),
    ("ray-worker", "ray-head"),
    ("ray-worker", "ray-worker"),
    ("ray-head", "minio"),
    ("ray-worker", "minio"),
    # The fanned-out teacher and prompts stages: jobs to the head, shards on the CPU workers.
    ("teacher", "ray-head"),
    ("prompts", "ray-head"),
    ("ray-head", "ray-cpu-worker"),
    ("ray-worker", "ray-cpu-worker"),
    ("ray-cpu-worker", "ray-head"),
    ("ray-cpu-worker", "ray-worker"),
    ("ray-cpu-worker", "ray-cpu-worker"),
    ("ray-cpu-worker", "minio"),
    ("ray-cpu-worker", "postgresql"),
    ("ray-cpu-worker", "teacher"),
    ("tests", "control-plane"),
    ("migrations", "postgresql"),
}


def endpoints(manifests: list[dict]) -> list[Endpoint]:
    return [
        Endpoint(
            component_of(pod),
            NAMESPACE,
            pod["metadata"]["labels"],
            frozenset(p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])),
        )
        for pod in pod_templates(manifests).values()
    ]


def by_name(points: list[Endpoint]) -> dict[str, Endpoint]:
    return {point.name: point for point in points}


@pytest.fixture(scope="module")
def default_network(render) -> tuple[NetworkModel, dict[str, Endpoint]]:
    manifests = render(None)
    return NetworkModel(of_kind(manifests, "NetworkPolicy")), by_name(endpoints(manifests))


def test_every_pod_is_isolated_by_a_network_policy(rendered: list[dict]) -> None:
    model = NetworkModel(of_kind(rendered, "NetworkPolicy"))
    for point in endpoints(rendered):
        assert model.is_isolated(point), f"{point.name} is not selected by an Ingress+Egress policy"


def test_pods_talk_exactly_along_the_designed_flows(default_network) -> None:
    model, points = default_network
    assert model.flows(points.values(), points.values()) == EXPECTED_FLOWS


def test_each_side_alone_allows_only_the_designed_flows(default_network) -> None:
    """Egress and ingress rules each enforce the flows, so one mistake does not open a path."""
    model, points = default_network
    public_ports = {
        "control-plane": {8080, 9090},
        "ray-head": {8080, 44217, 44227},
        "ray-worker": {8080},
        "ray-cpu-worker": {8080},
    } | {service: {9090} for service in STAGE_SERVICES}
    egress, ingress = set(), set()
    for source in points.values():
        for target in points.values():
            ports = set(target.ports) | {12345}
            if any(model.egress_allowed(source, target, port) for port in ports):
                egress.add((source.name, target.name))
            private = ports - public_ports.get(target.name, set())
            if any(model.ingress_allowed(target, source, port) for port in private):
                ingress.add((source.name, target.name))
    assert egress == EXPECTED_FLOWS
    assert ingress == EXPECTED_FLOWS - {("tests", "control-plane")}


def test_the_services_reach_each_other_only_on_their_grpc_ports(default_network) -> None:
    model, points = default_network
    assert model.open_ports(points["control-plane"], points["teacher"]) == {50052}
    assert model.open_ports(points["prompts"], points["teacher"]) == {50052}
    assert model.open_ports(points["trainer"], points["ray-head"]) == {8265}
    assert model.open_ports(points["teacher"], points["postgresql"]) == {5432}
    assert model.open_ports(points["teacher"], points["ray-head"]) == {8265}
    assert model.open_ports(points["prompts"], points["ray-head"]) == {8265}
    assert model.open_ports(points["ray-cpu-worker"], points["teacher"]) == {50052}
    assert model.open_ports(points["ray-cpu-worker"], points["postgresql"]) == {5432}


def test_from_another_namespace_only_the_api_and_metrics_are_reachable(default_network) -> None:
    model, points = default_network
    prometheus = Endpoint("prometheus", "monitoring", {"app": "prometheus"})
    reachable = {name: model.open_ports(prometheus, point) for name, point in points.items()}
    assert reachable == {
        "control-plane": {8080, 9090},
        **{service: {9090} for service in STAGE_SERVICES},
        "ray-head": {8080, 44217, 44227},
        "ray-worker": {8080},
        "ray-cpu-worker": {8080},
        "minio": set(),
        "postgresql": set(),
        "tests": set(),
        "migrations": set(),
    }


def test_only_the_teacher_and_its_shards_reach_outside_the_cluster(default_network) -> None:
    model, points = default_network
    kube_api_ports = {443, 6443}
    for name, point in points.items():
        any_port = model.egress_allowed(point, OUTSIDE, 8443)
        assert any_port == (name in ("teacher", "ray-cpu-worker")), name
        if name == "ray-head":
            assert all(model.egress_allowed(point, OUTSIDE, port) for port in kube_api_ports)


@pytest.mark.parametrize("teacher", ["teacher", "ray-cpu-worker"])
def test_the_teacher_reaches_only_public_addresses_by_default(default_network, teacher: str) -> None:
    model, points = default_network

    def reaches(address: str) -> bool:
        return model.egress_allowed(points[teacher], ipaddress.ip_address(address), 443)

    refused = ["169.254.169.254", "10.0.0.5", "10.96.0.1", "172.16.0.1", "192.168.1.1", "100.64.0.1"]
    refused += ["127.0.0.1", "fd00:ec2::254", "fe80::1", "::1"]
    assert [address for address in refused if reaches(address)] == []
    assert reaches("104.18.6.192") and reaches("2606:4700::6812:6c0")


def test_the_private_ranges_are_a_value_and_link_local_stays_refused(render) -> None:
    manifests = render(None, overrides=["networkPolicy.privateCidrs={10.0.0.0/8,fd00::/8}"])
    model = NetworkModel(of_kind(manifests, "NetworkPolicy"))
    teacher = by_name(endpoints(manifests))["teacher"]

    def reaches(address: str) -> bool:
        return model.egress_allowed(teacher, ipaddress.ip_address(address), 443)

    assert reaches("192.168.1.1") and reaches("100.64.0.1") and reaches("104.18.6.192")
    assert not any(
        reaches(a) for a in ("10.0.0.5", "169.254.169.254", "fd00:ec2::254", "fe80::1", "127.0.0.1")
    )


def test_the_teacher_reaches_extra_peers_or_nothing_outside(render) -> None:
    vllm = Endpoint("vllm", "models", {"app": "vllm"}, frozenset({8000}))
    peer = "teacher.egressTo[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=models"
    manifests = render(None, overrides=[peer, "teacher.egressTo[0].podSelector.matchLabels.app=vllm"])
    model = NetworkModel(of_kind(manifests, "NetworkPolicy"))
    points = by_name(endpoints(manifests))
    for teacher in (points["teacher"], points["ray-cpu-worker"]):
        assert model.egress_allowed(teacher, vllm, 8000)
        assert model.egress_allowed(teacher, ipaddress.ip_address("104.18.6.192"), 443)
    assert not model.egress_allowed(points["ray-worker"], vllm, 8000)
    manifests = render(None, overrides=["teacher.egressPublic=false"])
    model = NetworkModel(of_kind(manifests, "NetworkPolicy"))
    points = by_name(endpoints(manifests))
    for teacher in (points["teacher"], points["ray-cpu-worker"]):
        assert not model.egress_allowed(teacher, ipaddress.ip_address("104.18.6.192"), 443)
        assert not model.egress_allowed(teacher, OUTSIDE, 443)


def test_the_teacher_service_gets_its_egress_allow_list(render) -> None:
    assert env_of(render(None), "teacher")["STILLHOUSE_TEACHER_EGRESS_ALLOW"]["value"] == "[]"
    manifests = render(None, overrides=["teacher.egressAllow={vllm.models.svc.cluster.local,10.8.0.0/16}"])
    value = env_of(manifests, "teacher")["STILLHOUSE_TEACHER_EGRESS_ALLOW"]["value"]
    assert json.loads(value) == ["vllm.models.svc.cluster.local", "10.8.0.0/16"]
    assert TeacherSettings(egress_allow=json.loads(value)).egress_allow == json.loads(value)


def test_the_teacher_service_gets_its_cache_bounds_when_set(render) -> None:
    bounds = {"STILLHOUSE_TEACHER_CACHE_MAX_AGE_DAYS", "STILLHOUSE_TEACHER_CACHE_MAX_ENTRIES"}
    assert not bounds & set(env_of(render(None), "teacher"))
    # From a values file, where Helm reads numbers as floats: 50000000 must not arrive as 5e+07.
    env = env_of(render(VALUES_SETS["gpu-workers-values"]), "teacher")
    assert [env[name]["value"] for name in sorted(bounds)] == ["90", "50000000"]
    env = env_of(render(None, overrides=["teacher.cache.maxEntries=1000"]), "teacher")
    assert env["STILLHOUSE_TEACHER_CACHE_MAX_ENTRIES"]["value"] == "1000"
    assert "STILLHOUSE_TEACHER_CACHE_MAX_AGE_DAYS" not in env


def test_every_pod_but_the_databases_may_resolve_names(default_network) -> None:
    """Through CoreDNS / kube-dns, OpenShift's DNS pods (port 5353 behind the Service's 53), or
    NodeLocal DNSCache on the node's link-local address; not through any other pod or address."""
    model, points = default_network
    coredns = Endpoint("coredns", "kube-system", {"k8s-app": "kube-dns"}, frozenset({53}))
    openshift = Endpoint(
        "dns-default",
        "openshift-dns",
        {"dns.operator.openshift.io/daemonset-dns": "default"},
        frozenset({5353}),
    )
    node_local = ipaddress.ip_address("169.254.20.10")
    impostor = Endpoint("fake-dns", "default", {"k8s-app": "kube-dns"}, frozenset({53}))
    for name, point in points.items():
        resolves = name not in ("minio", "postgresql")
        for protocol in ("UDP", "TCP"):
            assert model.egress_allowed(point, coredns, 53, protocol) == resolves, name
            assert model.egress_allowed(point, openshift, 5353, protocol) == resolves, name
            assert model.egress_allowed(point, node_local, 53, protocol) == resolves, name
        assert not model.egress_allowed(points["trainer"], coredns, 53, "SCTP")
        assert not model.egress_allowed(point, impostor, 53), name
        assert not model.egress_allowed(point, ipaddress.ip_address("169.254.20.11"), 53), name
        assert not model.egress_allowed(point, node_local, 8443), name


def test_dns_servers_and_ports_are_values(render) -> None:
    manifests = render(
        None, overrides=["networkPolicy.dns.to[0].ipBlock.cidr=10.96.0.10/32", "networkPolicy.dns.ports={53}"]
    )
    model = NetworkModel(of_kind(manifests, "NetworkPolicy"))
    trainer = by_name(endpoints(manifests))["trainer"]
    coredns = Endpoint("coredns", "kube-system", {"k8s-app": "kube-dns"}, frozenset({53}))
    assert model.egress_allowed(trainer, ipaddress.ip_address("10.96.0.10"), 53)
    assert not model.egress_allowed(trainer, ipaddress.ip_address("10.96.0.10"), 5353)
    assert not model.egress_allowed(trainer, coredns, 53)


def test_the_ray_autoscaler_reaches_the_api_server_on_any_address_by_default(default_network) -> None:
    """No 0.0.0.0/0 ipBlock, which Cilium does not match to node addresses: a rule without peers."""
    model, points = default_network
    head = points["ray-head"]
    for address in ("10.0.0.1", "172.20.0.10", "203.0.113.5"):
        for port in (443, 6443):
            assert model.egress_allowed(head, ipaddress.ip_address(address), port), (address, port)
        assert not model.egress_allowed(head, ipaddress.ip_address(address), 8443), address
    assert not model.egress_allowed(points["ray-worker"], ipaddress.ip_address("10.0.0.1"), 443)


def test_the_api_server_addresses_are_a_value(render) -> None:
    manifests = render(None, overrides=["networkPolicy.kubeApiServer.cidrs={10.0.0.10/32,10.0.0.11/32}"])
    model = NetworkModel(of_kind(manifests, "NetworkPolicy"))
    head = by_name(endpoints(manifests))["ray-head"]
    assert model.egress_allowed(head, ipaddress.ip_address("10.0.0.11"), 6443)
    assert not model.egress_allowed(head, ipaddress.ip_address("10.0.0.12"), 6443)
    assert not model.egress_allowed(head, ipaddress.ip_address("203.0.113.5"), 443)


def test_external_storage_is_reached_only_on_its_ports(render) -> None:
    manifests = render(VALUES_SETS["external-storage-values"])
    model = NetworkModel(of_kind(manifests, "NetworkPolicy"))
    points = by_name(endpoints(manifests))
    assert "minio" not in points and "postgresql" not in points
    for name in ["prompts", "storage", "trainer", "ray-head", "ray-worker"]:
        assert model.egress_allowed(points[name], OUTSIDE, 443), name
        assert not model.egress_allowed(points[name], OUTSIDE, 5432), name
    assert model.egress_allowed(points["control-plane"], OUTSIDE, 5432)
    assert not model.egress_allowed(points["control-plane"], OUTSIDE, 443)


def test_api_restricted_to_the_ingress_controller(render) -> None:
    manifests = render(VALUES_SETS["ingress-tls-values"])
    model = NetworkModel(of_kind(manifests, "NetworkPolicy"))
    points = by_name(endpoints(manifests))
    controller = Endpoint("nginx", "ingress-nginx", {"app": "ingress-nginx"})
    stranger = Endpoint("stranger", "default", {"app": "curl"})
    # The metrics port is open to networkPolicy.metricsFrom (pods in any namespace by default).
    metrics = {9090}
    assert model.open_ports(controller, points["control-plane"]) == {8080} | metrics
    assert model.open_ports(stranger, points["control-plane"]) == metrics
    # `helm test` still reaches the API.
    assert model.open_ports(points["tests"], points["control-plane"]) == {8080}
    assert model.open_ports(points["tests"], points["teacher"]) == set()
    ingress = of_kind(manifests, "Ingress")[0]
    assert ingress["spec"]["tls"] == [{"secretName": "stillhouse-tls", "hosts": ["stillhouse.example.com"]}]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{PREFIX}-control-plane", "port": {"name": "http"}}


# --- secrets -----------------------------------------------------------------------------------------


def secret_values(manifests: list[dict]) -> set[str]:
    values = set()
    for secret in of_kind(manifests, "Secret"):
        values |= {base64.b64decode(value).decode() for value in (secret.get("data") or {}).values()}
        values |= set((secret.get("stringData") or {}).values())
    return {value for value in values if value}


def test_no_secret_value_appears_in_plain_text(render) -> None:
    manifests = render(None, ("teacher.apiKeys.values.deepseek=sk-test-0123456789",))
    secrets = secret_values(manifests)
    assert "sk-test-0123456789" in secrets and len(secrets) >= 5
    plain = [m for m in manifests if m["kind"] != "Secret"]
    text = json.dumps(plain)
    assert not [value for value in secrets if value in text]
    for config_map in of_kind(manifests, "ConfigMap"):
        assert not secrets & set((config_map.get("data") or {}).values())


def test_credentials_reach_containers_only_through_secret_references(rendered: list[dict]) -> None:
    sensitive = ("PASSWORD", "SECRET_KEY", "ACCESS_KEY", "TOKEN", "DATABASE_URL", "CACHE_URL")
    for name, pod in pod_templates(rendered).items():
        for container in containers(pod):
            for entry in container.get("env", []):
                if entry["name"].endswith(sensitive) and "value" in entry:
                    # A URL assembled by Kubernetes from a secret-backed variable holds no secret itself.
                    assert "$(STILLHOUSE_DATABASE_PASSWORD)" in entry["value"], f"{name}: {entry['name']}"


def test_generated_secrets_survive_upgrades_and_uninstall(rendered: list[dict]) -> None:
    generated = [s for s in of_kind(rendered, "Secret") if not s["metadata"]["name"].endswith("api-keys")]
    assert generated
    for secret in generated:
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


# --- Ray ----------------------------------------------------------------------------------------------


def raycluster(manifests: list[dict]) -> dict:
    (cluster,) = of_kind(manifests, "RayCluster")
    return cluster["spec"]


def worker_group(spec: dict, name: str) -> dict:
    (group,) = [group for group in spec["workerGroupSpecs"] if group["groupName"] == name]
    return group


@pytest.mark.parametrize(
    ("values_name", "gpus", "max_workers"), [("default", 1, 8), ("gpu-workers-values", 2, 16)]
)
def test_gpu_workers_request_gpus_and_land_on_gpu_nodes(render, values_name, gpus, max_workers) -> None:
    spec = raycluster(render(VALUES_SETS[values_name]))
    group = worker_group(spec, "gpu")
    assert (group["minReplicas"], group["maxReplicas"]) == (0, max_workers)
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # No node label by default: a node autoscaler matches the GPU request and toleration.
    expected = {} if values_name == "default" else {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    assert pod.get("nodeSelector", {}) == expected
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_kind_workers_are_cpu_only(render) -> None:
    group = worker_group(raycluster(render(VALUES_SETS["kind-dev"])), "cpu")
    (container,) = group["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert "nodeSelector" not in group["template"]["spec"]


def test_ray_autoscales_in_tree_and_shares_the_auth_token(rendered: list[dict]) -> None:
    spec = raycluster(rendered)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    token_secrets = set()
    for container in [
        spec["autoscalerOptions"],
        spec["headGroupSpec"]["template"]["spec"]["containers"][0],
        spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0],
    ]:
        env = {entry["name"]: entry for entry in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        token_secrets.add(env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"])
    assert token_secrets == {f"{PREFIX}-ray-auth"}
    named(rendered, "Secret", f"{PREFIX}-ray-auth")


@pytest.mark.parametrize("values_name", ["default", "external-storage-values"])
def test_ray_pods_hold_the_object_store_keys_of_the_trainer(render, values_name) -> None:
    """Training reads object storage with keys from the Ray pods' own environment (a Ray job's
    environment is shown by the dashboard), the same Secret keys the trainer service has."""
    manifests = render(VALUES_SETS[values_name])
    spec = raycluster(manifests)
    trainer = named(manifests, "Deployment", f"{PREFIX}-trainer")["spec"]["template"]["spec"]
    trainer_env = {entry["name"]: entry for entry in trainer["containers"][0]["env"]}
    expected = {
        "STILLHOUSE_OBJECT_STORE_ACCESS_KEY": trainer_env["STILLHOUSE_TRAINER_OBJECT_STORE__ACCESS_KEY"],
        "STILLHOUSE_OBJECT_STORE_SECRET_KEY": trainer_env["STILLHOUSE_TRAINER_OBJECT_STORE__SECRET_KEY"],
    }
    for pod in [spec["headGroupSpec"]["template"]["spec"], spec["workerGroupSpecs"][0]["template"]["spec"]]:
        env = {entry["name"]: entry for entry in pod["containers"][0]["env"]}
        for name, trainer_entry in expected.items():
            assert env[name]["valueFrom"] == trainer_entry["valueFrom"], name
            assert "secretKeyRef" in env[name]["valueFrom"]


def test_gpu_worker_bounds_are_checked(helm) -> None:
    result = helm.template(None, ("rayCluster.gpuWorkers.minReplicas=3", "rayCluster.gpuWorkers.replicas=1"))
    assert result.returncode != 0
    assert "minReplicas <= replicas <= maxReplicas" in result.stderr


# --- availability and scaling -------------------------------------------------------------------------


def test_each_deployment_has_a_disruption_budget_and_spreads_over_nodes(render) -> None:
    manifests = render(None)
    budgets = {pdb["metadata"]["name"]: pdb for pdb in of_kind(manifests, "PodDisruptionBudget")}
    for component in DEPLOYMENTS:
        deployment = named(manifests, "Deployment", f"{PREFIX}-{component}")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        budget = budgets[f"{PREFIX}-{component}"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
        if component == "control-plane":  # one pod stays up, and one may go: drains proceed
            assert deployment["spec"]["replicas"] > budget["spec"]["minAvailable"] >= 1
        else:
            assert budget["spec"]["maxUnavailable"] >= 1
        (spread,) = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert spread["labelSelector"]["matchLabels"].items() <= labels.items()


def test_control_plane_replicas_roll_with_one_always_serving(rendered: list[dict]) -> None:
    deployment = named(rendered, "Deployment", f"{PREFIX}-control-plane")
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {variable["name"]: variable.get("value") for variable in container["env"]}
    assert env["STILLHOUSE_CONTROL_PLANE_MIGRATE_AT_START"] == "false"
    assert float(env["STILLHOUSE_CONTROL_PLANE_LEADER_LEASE_SECONDS"]) > 0


@pytest.mark.parametrize(
    ("values_name", "install_hook"), [("default", "post-install"), ("external-storage-values", "pre-install")]
)
def test_migrations_run_as_a_hook_job_with_the_control_planes_image_and_database(
    render, values_name: str, install_hook: str
) -> None:
    """With the chart's PostgreSQL, which the install creates, the migrations run right after install."""
    manifests = render(VALUES_SETS[values_name])
    job = named(manifests, "Job", f"{PREFIX}-migrations")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == f"{install_hook},pre-upgrade"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    control_plane = named(manifests, "Deployment", f"{PREFIX}-control-plane")["spec"]["template"]["spec"]
    assert container["command"] == ["stillhouse", "migrate"]
    assert container["image"] == control_plane["containers"][0]["image"]
    assert container["securityContext"] == control_plane["containers"][0]["securityContext"]
    assert job["spec"]["template"]["spec"]["securityContext"] == control_plane["securityContext"]
    database_url = [v for v in container["env"] if v["name"] == "STILLHOUSE_CONTROL_PLANE_DATABASE_URL"]
    assert database_url == [
        v
        for v in control_plane["containers"][0]["env"]
        if v["name"] == "STILLHOUSE_CONTROL_PLANE_DATABASE_URL"
    ]


def test_teacher_autoscaler_owns_the_replica_count(render) -> None:
    assert not of_kind(render(None), "HorizontalPodAutoscaler")
    manifests = render(VALUES_SETS["gpu-workers-values"])
    (hpa,) = of_kind(manifests, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{PREFIX}-teacher",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert "replicas" not in named(manifests, "Deployment", f"{PREFIX}-teacher")["spec"]


# --- identity -----------------------------------------------------------------------------------------


def test_each_component_has_its_own_service_account_and_only_the_ray_head_a_token(
    rendered: list[dict],
) -> None:
    accounts = {sa["metadata"]["name"]: sa for sa in of_kind(rendered, "ServiceAccount")}
    for name, pod in pod_templates(rendered).items():
        account = pod["spec"]["serviceAccountName"]
        assert account in accounts, f"{name} uses a ServiceAccount the chart does not make"
        mounts_token = pod["spec"]["automountServiceAccountToken"]
        assert mounts_token == (component_of(pod) == "ray-head"), name
        assert accounts[account]["automountServiceAccountToken"] == mounts_token, name


def test_rbac_grants_only_the_ray_autoscaler_what_it_needs(rendered: list[dict]) -> None:
    assert not of_kind(rendered, "ClusterRole") and not of_kind(rendered, "ClusterRoleBinding")
    (role,) = of_kind(rendered, "Role")
    (binding,) = of_kind(rendered, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{PREFIX}-ray-head", "namespace": NAMESPACE}
    ]
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r for r in role["rules"]}
    assert set(rules[(("",), ("pods",))]["verbs"]) == {"get", "list", "watch", "patch"}
    clusters = rules[(("ray.io",), ("rayclusters",))]
    assert set(clusters["verbs"]) == {"get", "patch"}
    assert clusters["resourceNames"] == [of_kind(rendered, "RayCluster")[0]["metadata"]["name"]]


# --- helm test ----------------------------------------------------------------------------------------


def test_helm_test_hooks_check_readiness_and_submit_a_job(rendered: list[dict]) -> None:
    hooks = [
        pod for pod in of_kind(rendered, "Pod") if pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    ]
    scripts = {pod["metadata"]["name"]: "\n".join(pod["spec"]["containers"][0]["args"]) for pod in hooks}
    assert len(scripts) == 2
    readyz = scripts[f"{PREFIX}-test-readyz"]
    assert f"http://{PREFIX}-control-plane:8080/readyz" in readyz
    submit = scripts[f"{PREFIX}-test-submit-job"]
    assert "stillhouse submit" in submit and "stillhouse cancel" in submit
