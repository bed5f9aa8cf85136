"""The integration settings of `podDefaults` and of each workload reach every pod the chart makes:
runtime and priority class, affinity, spread constraints, labels, annotations, extra volumes, mounts,
environment and envFrom; ServiceAccount annotations; extra Ray worker groups; GPU workers that a node
autoscaler can scale up from zero."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .conftest import RELEASE, VALUES_SETS, Helm, Manifest, of_kind, pod_templates
from .test_chart import KUBERNETES_VERSIONS, kubernetes_validator, raycluster_validator

PREFIX = f"{RELEASE}-stillhouse"
CLUSTER = f"RayCluster/{PREFIX}-ray"
# Each workload's values, and the pods it makes.
WORKLOADS = {
    # The migrations Job's pods take the control plane's settings.
    "controlPlane": [f"Deployment/{PREFIX}-control-plane", f"Job/{PREFIX}-migrations"],
    "prompts": [f"Deployment/{PREFIX}-prompts"],
    "teacher": [f"Deployment/{PREFIX}-teacher"],
    "storage": [f"Deployment/{PREFIX}-storage"],
    "trainer": [f"Deployment/{PREFIX}-trainer"],
    "minio": [f"StatefulSet/{PREFIX}-minio"],
    "postgresql": [f"StatefulSet/{PREFIX}-postgresql"],
    "rayCluster.head": [f"{CLUSTER}/head"],
    "rayCluster.gpuWorkers": [f"{CLUSTER}/gpu"],
    "rayCluster.cpuWorkers": [f"{CLUSTER}/fanout"],
    "rayCluster.additionalWorkerGroups.0": [f"{CLUSTER}/cpu"],
    "tests": [f"Pod/{PREFIX}-test-readyz", f"Pod/{PREFIX}-test-submit-job"],
}
CPU_GROUP = {
    "name": "cpu",
    "replicas": 1,
    "minReplicas": 1,
    "maxReplicas": 4,
    "resources": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "16Gi"}},
    "shmSizeLimit": "4Gi",
    "nodeSelector": {"node.kubernetes.io/instance-type": "m7i.4xlarge"},
}


def settings(tag: str) -> dict:
    """One value of every pod setting, told apart by `tag`."""
    return {
        "runtimeClassName": f"runtime-{tag}",
        "priorityClassName": f"priority-{tag}",
        "affinity": {
            "nodeAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 1,
                        "preference": {"matchExpressions": [{"key": f"pool-{tag}", "operator": "Exists"}]},
                    }
                ]
            }
        },
        "topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": f"zone-{tag}", "whenUnsatisfiable": "ScheduleAnyway"}
        ],
        "podAnnotations": {f"example.com/note-{tag}": tag},
        "podLabels": {f"team-{tag}": tag},
        "extraVolumes": [{"name": f"ca-{tag}", "configMap": {"name": f"ca-bundle-{tag}"}}],
        "extraVolumeMounts": [{"name": f"ca-{tag}", "mountPath": f"/etc/ca-{tag}", "readOnly": True}],
        "extraEnv": [{"name": f"EXTRA_{tag.upper().replace('-', '_')}", "value": tag}],
        "extraEnvFrom": [{"configMapRef": {"name": f"proxy-{tag}"}}],
    }


def nested(path: str, value: dict) -> dict:
    """{"a": {"b": value}} for "a.b"; a numeric part is an index into a list (the extra worker group)."""
    parts = path.split(".")
    if parts[-1].isdigit():
        group = {**CPU_GROUP, **value}
        return _list_at(parts[:-1], group)
    document: dict = value
    for part in reversed(parts):
        document = {part: document}
    return document


def _list_at(parts: list[str], item: dict) -> dict:
    document: object = [item]
    for part in reversed(parts):
        document = {part: document}
    assert isinstance(document, dict)
    return document


def merge(*documents: dict) -> dict:
    result: dict = {}
    for document in documents:
        for key, value in document.items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = merge(result[key], value)
            else:
                result[key] = value
    return result


def render_values(helm: Helm, tmp_path: Path, document: dict) -> list[Manifest]:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(document))
    result = helm.template(value_files=[path])
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def workload_tag(path: str) -> str:
    return path.replace(".", "-").lower()


@pytest.fixture(scope="module")
def with_settings(helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> list[Manifest]:
    """podDefaults set, and every workload's own settings besides (the extra worker group's too)."""
    document = {"podDefaults": settings("all")}
    for path in WORKLOADS:
        document = merge(document, nested(path, settings(workload_tag(path))))
    return render_values(helm, tmp_path_factory.mktemp("settings"), document)


def main_container(pod: dict) -> dict:
    return pod["spec"]["containers"][0]


def test_every_pod_of_the_chart_is_a_workload_with_settings(with_settings: list[Manifest]) -> None:
    assert set(pod_templates(with_settings)) == {pod for pods in WORKLOADS.values() for pod in pods}


@pytest.mark.parametrize("path", list(WORKLOADS))
def test_each_workload_takes_its_own_settings_over_the_defaults(with_settings, path: str) -> None:
    tag = workload_tag(path)
    own, defaults = settings(tag), settings("all")
    pods = pod_templates(with_settings)
    for name in WORKLOADS[path]:
        pod, spec = pods[name], pods[name]["spec"]
        # Scalars and affinity: the workload's replace the defaults.
        assert spec["runtimeClassName"] == own["runtimeClassName"], name
        assert spec["priorityClassName"] == own["priorityClassName"], name
        assert spec["affinity"] == own["affinity"], name
        # Spread constraints: the workload's, selecting the workload's own pods.
        (constraint,) = [c for c in spec["topologySpreadConstraints"] if c["topologyKey"] == f"zone-{tag}"]
        selector = constraint["labelSelector"]["matchLabels"]
        assert selector.items() <= pod["metadata"]["labels"].items(), name
        assert (
            selector["app.kubernetes.io/component"]
            == pod["metadata"]["labels"]["app.kubernetes.io/component"]
        )
        # Labels and annotations: merged.
        for key in ("podLabels", "podAnnotations"):
            field = "labels" if key == "podLabels" else "annotations"
            assert {**defaults[key], **own[key]}.items() <= pod["metadata"][field].items(), (name, key)
        # Lists: the defaults' entries, then the workload's.
        container = main_container(pod)
        assert spec["volumes"][-2:] == defaults["extraVolumes"] + own["extraVolumes"], name
        assert container["volumeMounts"][-2:] == defaults["extraVolumeMounts"] + own["extraVolumeMounts"], (
            name
        )
        assert container["env"][-2:] == defaults["extraEnv"] + own["extraEnv"], name
        assert container["envFrom"] == defaults["extraEnvFrom"] + own["extraEnvFrom"], name


def test_the_defaults_alone_reach_every_pod(helm: Helm, tmp_path: Path) -> None:
    manifests = render_values(
        helm, tmp_path, {"podDefaults": settings("all"), **nested("rayCluster.additionalWorkerGroups.0", {})}
    )
    defaults = settings("all")
    pods = pod_templates(manifests)
    assert len(pods) == sum(len(p) for p in WORKLOADS.values())
    for name, pod in pods.items():
        spec, container = pod["spec"], main_container(pod)
        assert spec["runtimeClassName"] == "runtime-all" and spec["priorityClassName"] == "priority-all", name
        assert spec["affinity"] == defaults["affinity"], name
        assert any(c["topologyKey"] == "zone-all" for c in spec["topologySpreadConstraints"]), name
        assert pod["metadata"]["labels"]["team-all"] == "all", name
        assert pod["metadata"]["annotations"]["example.com/note-all"] == "all", name
        assert defaults["extraVolumes"][0] in spec["volumes"], name
        assert defaults["extraVolumeMounts"][0] in container["volumeMounts"], name
        assert defaults["extraEnv"][0] in container["env"], name
        assert container["envFrom"] == defaults["extraEnvFrom"], name


@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
def test_pods_with_every_setting_are_valid_kubernetes(with_settings, kubernetes_version: str) -> None:
    problems = []
    for manifest in with_settings:
        if manifest["apiVersion"].startswith("ray.io/"):
            continue
        validator = kubernetes_validator(kubernetes_version, manifest["kind"], manifest["apiVersion"])
        problems += [f"{manifest['metadata']['name']}: {e.message}" for e in validator.iter_errors(manifest)]
    assert not problems, "\n".join(problems)
    (cluster,) = of_kind(with_settings, "RayCluster")
    assert not list(raycluster_validator().iter_errors(cluster))


def test_the_chart_labels_win_over_pod_labels(helm: Helm, tmp_path: Path) -> None:
    hijack = {"app.kubernetes.io/component": "other", "app.kubernetes.io/instance": "other"}
    manifests = render_values(
        helm, tmp_path, {"podDefaults": {"podLabels": hijack}, "teacher": {"podLabels": hijack}}
    )
    for name, pod in pod_templates(manifests).items():
        assert pod["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE, name
        assert pod["metadata"]["labels"]["app.kubernetes.io/component"] != "other", name


def test_the_chart_keeps_its_own_annotations(helm: Helm, tmp_path: Path) -> None:
    document = {"podDefaults": {"podAnnotations": {"helm.sh/hook": "pre-install", "prometheus.io/port": "1"}}}
    pods = pod_templates(render_values(helm, tmp_path, document))
    assert pods[f"Pod/{PREFIX}-test-readyz"]["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pods[f"Deployment/{PREFIX}-teacher"]["metadata"]["annotations"]["prometheus.io/port"] == "9090"


def test_no_settings_no_extra_fields(render) -> None:
    for name, pod in pod_templates(render(None)).items():
        assert not {"runtimeClassName", "priorityClassName"} & set(pod["spec"]), name
        assert "envFrom" not in main_container(pod), name


def test_every_service_account_gets_its_annotations(helm: Helm, tmp_path: Path) -> None:
    role = {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/stillhouse"}
    trainer = {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/stillhouse-trainer"}
    document = {"serviceAccount": {"annotations": role, "componentAnnotations": {"trainer": trainer}}}
    accounts = of_kind(render_values(helm, tmp_path, document), "ServiceAccount")
    assert len(accounts) == 11
    for account in accounts:
        expected = trainer if account["metadata"]["name"] == f"{PREFIX}-trainer" else role
        # The migrations Job's ServiceAccount is a hook: Helm's own annotations come beside the role.
        given = {k: v for k, v in account["metadata"]["annotations"].items() if not k.startswith("helm.sh/")}
        assert given == expected, account["metadata"]["name"]


# --- Ray worker groups and GPU nodes -------------------------------------------------------------------


def worker_groups(manifests: list[Manifest]) -> dict[str, dict]:
    (cluster,) = of_kind(manifests, "RayCluster")
    return {group["groupName"]: group for group in cluster["spec"]["workerGroupSpecs"]}


def test_additional_worker_groups_join_the_cluster(helm: Helm, tmp_path: Path) -> None:
    gpu_group = {**CPU_GROUP, "name": "a100", "gpusPerWorker": 4, "replicas": 0, "minReplicas": 0}
    gpu_group["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    document = {"rayCluster": {"additionalWorkerGroups": [CPU_GROUP, gpu_group]}}
    groups = worker_groups(render_values(helm, tmp_path, document))
    assert list(groups) == ["gpu", "fanout", "cpu", "a100"]
    cpu, a100 = groups["cpu"], groups["a100"]
    assert (cpu["replicas"], cpu["minReplicas"], cpu["maxReplicas"]) == (1, 1, 4)
    assert cpu["template"]["spec"]["nodeSelector"] == CPU_GROUP["nodeSelector"]
    assert "nvidia.com/gpu" not in json.dumps(cpu["template"]["spec"]["containers"][0]["resources"])
    resources = a100["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 4
    assert a100["template"]["spec"]["tolerations"] == gpu_group["tolerations"]
    # Every group's pods but the CPU workers' (see test_fanout.py) are Ray workers to the
    # NetworkPolicies and ServiceAccounts.
    for name, group in groups.items():
        if name == "fanout":
            continue
        labels = group["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == "ray-worker"
        assert group["template"]["spec"]["serviceAccountName"] == f"{PREFIX}-ray-worker"


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        ([CPU_GROUP, CPU_GROUP], 'additionalWorkerGroups[1].name "cpu" is used by another worker group'),
        (
            [{**CPU_GROUP, "name": "gpu"}],
            'additionalWorkerGroups[0].name "gpu" is used by another worker group',
        ),
        (
            [{**CPU_GROUP, "name": "fanout"}],
            'additionalWorkerGroups[0].name "fanout" is used by another worker group',
        ),
        (
            [{**CPU_GROUP, "minReplicas": 5}],
            "rayCluster.additionalWorkerGroups[0] needs minReplicas <= replicas",
        ),
    ],
    ids=["duplicate", "same as gpuWorkers", "same as cpuWorkers", "bounds"],
)
def test_bad_worker_groups_are_refused(helm: Helm, tmp_path: Path, groups: list, expected: str) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({"rayCluster": {"additionalWorkerGroups": groups}}))
    result = helm.template(value_files=[path])
    assert result.returncode != 0 and expected in result.stderr, result.stderr


def test_gpu_workers_scale_from_zero_without_a_post_boot_label(render) -> None:
    """A node autoscaler sees a pending worker's `nvidia.com/gpu` request and toleration and starts a
    GPU node; a node label that exists only after a node booted would never match a node template."""
    group = worker_groups(render(None))["gpu"]
    spec = group["template"]["spec"]
    assert group["minReplicas"] == 0
    assert "nodeSelector" not in spec and "affinity" not in spec
    assert spec["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


@pytest.mark.parametrize("values_name", list(VALUES_SETS))
def test_no_pod_selects_a_label_of_gpu_feature_discovery(render, values_name: str) -> None:
    for name, pod in pod_templates(render(VALUES_SETS[values_name])).items():
        text = json.dumps({k: pod["spec"].get(k) for k in ("nodeSelector", "affinity")})
        assert "nvidia.com/gpu." not in text, name


def test_the_gpu_node_selector_is_a_value(render) -> None:
    manifests = render(
        None,
        overrides=[
            "rayCluster.gpuWorkers.nodeSelector.cloud\\.google\\.com/gke-accelerator=nvidia-h100-80gb"
        ],
    )
    group = worker_groups(manifests)["gpu"]
    assert group["template"]["spec"]["nodeSelector"] == {
        "cloud.google.com/gke-accelerator": "nvidia-h100-80gb"
    }
