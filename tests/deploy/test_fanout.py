"""The teacher and prompts stages fan out over the RayCluster's CPU workers: a CPU-only worker group
sized by its CPU limit and scaled by the in-tree autoscaler, the services' fan-out settings pointing at
the head the trainer submits to, the workers holding exactly what the shards need, and the network
paths between them."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import yaml

from .conftest import NAMESPACE, RELEASE, VALUES_SETS, Helm, named, of_kind, pod_templates
from .network_model import OUTSIDE, NetworkModel
from .test_chart import raycluster_validator
from .test_manifests import by_name, endpoints

PREFIX = f"{RELEASE}-stillhouse"
HEAD_ADDRESS = f"http://{PREFIX}-ray-head-svc.{NAMESPACE}.svc:8265"
FANOUT_SETTINGS = ["MIN_ROWS", "SHARD_ROWS", "MAX_PARALLEL_SHARDS", "CPUS_PER_SHARD", "MAX_RETRIES"]


def cluster_spec(manifests: list[dict]) -> dict:
    (cluster,) = of_kind(manifests, "RayCluster")
    return cluster["spec"]


def groups(manifests: list[dict]) -> dict[str, dict]:
    return {group["groupName"]: group for group in cluster_spec(manifests)["workerGroupSpecs"]}


def cpu_worker(manifests: list[dict]) -> tuple[dict, dict]:
    """The CPU workers' pod spec and main container."""
    pod = groups(manifests)["fanout"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def env_by_name(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def service_env(manifests: list[dict], service: str) -> dict[str, dict]:
    (container,) = named(manifests, "Deployment", f"{PREFIX}-{service}")["spec"]["template"]["spec"][
        "containers"
    ]
    return env_by_name(container)


def fanout_env(manifests: list[dict], service: str) -> dict[str, str]:
    prefix = f"STILLHOUSE_{service.upper()}_FANOUT__"
    return {
        name.removeprefix(prefix): entry["value"]
        for name, entry in service_env(manifests, service).items()
        if name.startswith(prefix)
    }


def referenced_secrets(pod: dict) -> set[str]:
    """Every Secret a pod's containers or volumes name."""
    names = set()
    for container in pod["containers"]:
        for entry in container.get("env", []):
            if "secretKeyRef" in entry.get("valueFrom", {}):
                names.add(entry["valueFrom"]["secretKeyRef"]["name"])
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    return names


def shard_resources(group: dict) -> dict[str, float]:
    """A group's custom Ray resources, read as KubeRay's autoscaler reads `rayStartParams.resources`:
    a JSON object inside a pair of quotes, its own quotes escaped."""
    text = group["rayStartParams"].get("resources")
    return json.loads(text[1:-1].replace("\\", "")) if text else {}


def network(manifests: list[dict]) -> tuple[NetworkModel, dict]:
    return NetworkModel(of_kind(manifests, "NetworkPolicy")), by_name(endpoints(manifests))


def render_document(helm: Helm, tmp_path: Path, document: dict) -> list[dict]:
    """The chart rendered with a values file (numbers and strings typed as written, unlike --set)."""
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(document))
    result = helm.template(value_files=[path])
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


# --- the worker group ---------------------------------------------------------------------------------


def test_the_cpu_workers_are_a_cpu_only_group_whose_ray_cpus_are_their_cpu_limit(
    render, helm: Helm, tmp_path: Path
) -> None:
    manifests = render(None)
    group = groups(manifests)["fanout"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (0, 0, 8)
    pod, container = cpu_worker(manifests)
    assert group["rayStartParams"]["num-cpus"] == str(container["resources"]["limits"]["cpu"]) == "2"
    assert group["rayStartParams"]["num-gpus"] == "0"
    assert shard_resources(group) == {"stillhouse_shard_cpu": 2}
    assert "nvidia.com/gpu" not in json.dumps(container["resources"]) + json.dumps(pod.get("tolerations", []))
    assert group["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "ray-cpu-worker"
    assert pod["serviceAccountName"] == f"{PREFIX}-ray-cpu-worker"
    assert pod["automountServiceAccountToken"] is False

    manifests = render(None, overrides=["rayCluster.cpuWorkers.resources.limits.cpu=8"])
    assert groups(manifests)["fanout"]["rayStartParams"]["num-cpus"] == "8"
    # An explicit `ray start` parameter wins (e.g. more shards than CPUs for I/O-bound teachers).
    document = {"rayCluster": {"cpuWorkers": {"rayStartParams": {"num-cpus": "4"}}}}
    group = groups(render_document(helm, tmp_path, document))["fanout"]
    assert group["rayStartParams"]["num-cpus"] == "4"
    assert shard_resources(group) == {"stillhouse_shard_cpu": 4}
    # No other group has the resource the shards ask for: they never land on (or start) GPU workers.
    assert [name for name, other in groups(render(None)).items() if shard_resources(other)] == ["fanout"]


def test_the_shard_resource_is_the_charts_own(helm: Helm) -> None:
    result = helm.template(overrides=["rayCluster.cpuWorkers.rayStartParams.resources=x"])
    assert result.returncode != 0
    assert "rayCluster.cpuWorkers.rayStartParams.resources is set by the chart" in result.stderr


def test_the_autoscaler_grows_the_cpu_workers_for_waiting_shards(render) -> None:
    overrides = [
        "rayCluster.autoscaler.upscalingMode=Aggressive",
        "rayCluster.autoscaler.idleTimeoutSeconds=120",
        "rayCluster.autoscaler.resources.limits.memory=1Gi",
    ]
    manifests = render(None, overrides=overrides)
    spec = cluster_spec(manifests)
    assert spec["enableInTreeAutoscaling"] is True
    options = spec["autoscalerOptions"]
    assert (options["upscalingMode"], options["idleTimeoutSeconds"]) == ("Aggressive", 120)
    assert options["resources"]["limits"]["memory"] == "1Gi"
    group = groups(manifests)["fanout"]
    assert group["minReplicas"] < group["maxReplicas"]
    head = spec["headGroupSpec"]["template"]["spec"]
    assert head["automountServiceAccountToken"] is True
    (role,) = of_kind(manifests, "Role")
    assert role["metadata"]["name"] == f"{PREFIX}-ray-head"
    assert not list(raycluster_validator().iter_errors(of_kind(manifests, "RayCluster")[0]))


def test_without_the_autoscaler_the_groups_keep_their_replicas_and_the_head_gets_no_rights(render) -> None:
    manifests = render(None, overrides=["rayCluster.autoscaler.enabled=false"])
    spec = cluster_spec(manifests)
    assert spec["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in spec
    assert not of_kind(manifests, "Role") and not of_kind(manifests, "RoleBinding")
    assert spec["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is False
    account = named(manifests, "ServiceAccount", f"{PREFIX}-ray-head")
    assert account["automountServiceAccountToken"] is False
    model, points = network(manifests)
    assert not model.egress_allowed(points["ray-head"], ipaddress.ip_address("10.0.0.1"), 443)
    assert not list(raycluster_validator().iter_errors(of_kind(manifests, "RayCluster")[0]))
    # No CPU worker would ever start: the stages stay in their services' processes.
    assert not fanout_env(manifests, "teacher") and not fanout_env(manifests, "prompts")
    manifests = render(
        None, overrides=["rayCluster.autoscaler.enabled=false", "rayCluster.cpuWorkers.replicas=2"]
    )
    assert groups(manifests)["fanout"]["replicas"] == 2
    assert fanout_env(manifests, "teacher")["RAY_ADDRESS"] == HEAD_ADDRESS


def test_the_cpu_worker_group_name_is_its_own(helm: Helm) -> None:
    result = helm.template(overrides=["rayCluster.cpuWorkers.groupName=gpu"])
    assert result.returncode != 0
    assert 'rayCluster.cpuWorkers.groupName "gpu" is used by another worker group' in result.stderr


# --- the services' fan-out settings ------------------------------------------------------------------


def test_the_stages_fan_out_to_the_head_the_trainer_submits_to(render) -> None:
    manifests = render(None)
    trainer = service_env(manifests, "trainer")
    for service in ("teacher", "prompts"):
        settings = fanout_env(manifests, service)
        assert settings["RAY_ADDRESS"] == trainer["STILLHOUSE_TRAINER_RAY_ADDRESS"]["value"] == HEAD_ADDRESS
        token_file = Path(settings["RAY_AUTH_TOKEN_FILE"])
        assert token_file == Path(trainer["STILLHOUSE_TRAINER_RAY_AUTH_TOKEN_FILE"]["value"])
        pod = named(manifests, "Deployment", f"{PREFIX}-{service}")["spec"]["template"]["spec"]
        mount = next(
            m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == str(token_file.parent)
        )
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert mount["readOnly"] is True
        assert volume["secret"]["secretName"] == f"{PREFIX}-ray-auth"
        assert set(settings) == {"RAY_ADDRESS", "RAY_AUTH_TOKEN_FILE", "SHARD_RESOURCE", *FANOUT_SETTINGS}
        assert settings["SHARD_RESOURCE"] == "stillhouse_shard_cpu"


def test_the_fan_out_knobs_are_values(helm: Helm, tmp_path: Path) -> None:
    teacher = {
        "minRows": 10000,
        "shardRows": 250,
        "maxParallelShards": 64,
        "cpusPerShard": 0.5,
        "maxRetries": 0,
    }
    # Helm reads numbers in a values file as floats: 100000 must not arrive as 1e+05.
    document = {"teacher": {"fanout": teacher}, "prompts": {"fanout": {"shardRows": 100000}}}
    manifests = render_document(helm, tmp_path, document)
    settings = fanout_env(manifests, "teacher")
    assert [settings[name] for name in FANOUT_SETTINGS] == ["10000", "250", "64", "0.5", "0"]
    assert fanout_env(manifests, "prompts")["SHARD_ROWS"] == "100000"


def test_a_stage_without_cpu_workers_runs_in_its_service(render) -> None:
    for overrides in (
        ["rayCluster.cpuWorkers.enabled=false"],
        ["rayCluster.enabled=false", "trainer.externalRayAddress=http://ray-head.ray:8265"],
    ):
        manifests = render(None, overrides=overrides)
        for service in ("teacher", "prompts"):
            assert not fanout_env(manifests, service), (overrides, service)
            pod = named(manifests, "Deployment", f"{PREFIX}-{service}")["spec"]["template"]["spec"]
            assert "ray-auth" not in [volume["name"] for volume in pod["volumes"]]
        assert f"RayCluster/{PREFIX}-ray/fanout" not in pod_templates(manifests)
        accounts = [account["metadata"]["name"] for account in of_kind(manifests, "ServiceAccount")]
        assert f"{PREFIX}-ray-cpu-worker" not in accounts
        model, points = network(manifests)
        assert "ray-cpu-worker" not in points
        if "ray-head" in points:
            assert not model.open_ports(points["teacher"], points["ray-head"])


# --- what the workers hold ----------------------------------------------------------------------------


def test_the_cpu_workers_get_the_teachers_settings_from_the_same_secrets(render) -> None:
    overrides = ["teacher.limiterStorageSecret.name=redis-uri", "teacher.egressAllow={10.8.0.0/16}"]
    manifests = render(VALUES_SETS["gpu-workers-values"], overrides=overrides)
    pod, container = cpu_worker(manifests)
    worker = env_by_name(container)
    teacher = service_env(manifests, "teacher")
    own = ("SERVICE_TOKEN_FILE", "FANOUT__", "TLS_")
    shared = [
        name for name in teacher if name.startswith("STILLHOUSE_") and not any(part in name for part in own)
    ]
    assert "STILLHOUSE_TEACHER_CACHE_URL" in shared and "STILLHOUSE_TEACHER_LIMITER_STORAGE_URI" in shared
    assert {name: worker.get(name) for name in shared} == {name: teacher[name] for name in shared}
    teacher_pod = named(manifests, "Deployment", f"{PREFIX}-teacher")["spec"]["template"]["spec"]
    keys = next(v for v in teacher_pod["volumes"] if v["name"] == "teacher-api-keys")
    assert next(v for v in pod["volumes"] if v["name"] == "teacher-api-keys") == keys
    key_dir = worker["STILLHOUSE_TEACHER_API_KEY_DIR"]["value"]
    assert {"name": "teacher-api-keys", "mountPath": key_dir, "readOnly": True} in container["volumeMounts"]


def test_the_cpu_workers_hold_only_the_secrets_the_shards_need(render) -> None:
    manifests = render(None)
    pod, _ = cpu_worker(manifests)
    secrets = {name.removeprefix(f"{PREFIX}-") for name in referenced_secrets(pod)}
    # Ray's token, the object store's keys, the answer cache's password, the teacher's API keys, and
    # the service token the prompts shards call the teacher with; never the API tokens.
    assert secrets == {"ray-auth", "minio", "postgresql", "teacher-api-keys", "service-token"}
    gpu = groups(manifests)["gpu"]["template"]["spec"]
    assert {name.removeprefix(f"{PREFIX}-") for name in referenced_secrets(gpu)} == {"ray-auth", "minio"}

    manifests = render(None, overrides=["teacher.fanout.enabled=false"])
    pod, container = cpu_worker(manifests)
    assert {name.removeprefix(f"{PREFIX}-") for name in referenced_secrets(pod)} == {
        "ray-auth",
        "minio",
        "service-token",
    }
    assert not [name for name in env_by_name(container) if name.startswith("STILLHOUSE_TEACHER_")]
    manifests = render(None, overrides=["prompts.fanout.enabled=false"])
    pod, container = cpu_worker(manifests)
    assert "service-token" not in {name.removeprefix(f"{PREFIX}-") for name in referenced_secrets(pod)}
    assert not [name for name in env_by_name(container) if name.startswith("STILLHOUSE_PROMPTS_")]


# --- the network paths --------------------------------------------------------------------------------


def test_each_stage_that_fans_out_opens_only_its_own_paths(render) -> None:
    manifests = render(None, overrides=["teacher.fanout.enabled=false"])
    model, points = network(manifests)
    worker = points["ray-cpu-worker"]
    assert not model.open_ports(points["teacher"], points["ray-head"])
    assert model.open_ports(points["prompts"], points["ray-head"]) == {8265}
    assert not model.open_ports(worker, points["postgresql"])
    assert not model.egress_allowed(worker, OUTSIDE, 443)
    assert model.open_ports(worker, points["teacher"]) == {50052}

    manifests = render(None, overrides=["prompts.fanout.enabled=false"])
    model, points = network(manifests)
    worker = points["ray-cpu-worker"]
    assert not model.open_ports(points["prompts"], points["ray-head"])
    assert model.open_ports(points["teacher"], points["ray-head"]) == {8265}
    assert not model.open_ports(worker, points["teacher"])
    assert model.open_ports(worker, points["postgresql"]) == {5432}
    assert model.egress_allowed(worker, ipaddress.ip_address("104.18.6.192"), 443)


def test_the_gpu_workers_gain_nothing_from_the_fan_out(render) -> None:
    model, points = network(render(None))
    gpu = points["ray-worker"]
    assert not model.open_ports(gpu, points["postgresql"])
    assert not model.open_ports(gpu, points["teacher"])
    assert not model.egress_allowed(gpu, OUTSIDE, 443)


def test_the_cpu_workers_reach_an_external_database_and_store(render) -> None:
    """External S3 (0.0.0.0/0 on 443) and PostgreSQL (10.20.0.0/16 on 5432), as the teacher does;
    with the teacher's public egress off, nothing else outside."""
    manifests = render(VALUES_SETS["external-storage-values"], overrides=["teacher.egressPublic=false"])
    model, points = network(manifests)
    assert "minio" not in points and "postgresql" not in points
    for name in ("teacher", "ray-cpu-worker"):
        assert model.egress_allowed(points[name], ipaddress.ip_address("10.20.3.4"), 5432), name
        assert not model.egress_allowed(points[name], ipaddress.ip_address("10.21.3.4"), 5432), name
        assert model.egress_allowed(points[name], OUTSIDE, 443), name
        assert not model.egress_allowed(points[name], OUTSIDE, 8443), name
    assert not model.egress_allowed(points["ray-worker"], ipaddress.ip_address("10.20.3.4"), 5432)
