"""Model weights (`models.*`) reach every pod that loads a model at the same paths, and download links
are signed for the public endpoint (`objectStore.publicEndpoint`, or the MinIO Ingress's host)."""

from __future__ import annotations

import pytest

from .conftest import CHART, RELEASE, named, of_kind, pod_templates

MODEL_WEIGHTS = CHART / "ci" / "model-weights-values.yaml"
CACHE_PATH = "/var/cache/stillhouse/models"
LOADERS = [
    f"Deployment/{RELEASE}-stillhouse-teacher",
    f"Deployment/{RELEASE}-stillhouse-trainer",
    f"RayCluster/{RELEASE}-stillhouse-ray/head",
    f"RayCluster/{RELEASE}-stillhouse-ray/gpu",
    f"RayCluster/{RELEASE}-stillhouse-ray/fanout",
]


def main_container(pod: dict) -> dict:
    return pod["spec"]["containers"][0]


def mounts(pod: dict) -> dict[str, dict]:
    return {mount["name"]: mount for mount in main_container(pod)["volumeMounts"]}


def volumes(pod: dict) -> dict[str, dict]:
    return {volume["name"]: volume for volume in pod["spec"]["volumes"]}


def env(manifests: list[dict], component: str) -> dict[str, str]:
    deployment = named(manifests, "Deployment", f"{RELEASE}-stillhouse-{component}")
    container = main_container(deployment["spec"]["template"])
    return {entry["name"]: entry.get("value", "") for entry in container["env"]}


def test_by_default_each_model_loader_has_an_emptydir_cache_and_no_models_volume(render):
    pods = pod_templates(render(None))
    assert set(LOADERS) <= set(pods)
    for name in LOADERS:
        assert volumes(pods[name])["models-cache"] == {
            "name": "models-cache",
            "emptyDir": {"sizeLimit": "50Gi"},
        }
        assert mounts(pods[name])["models-cache"]["mountPath"] == CACHE_PATH, name
        assert "models" not in volumes(pods[name])
    for name in set(pods) - set(LOADERS):
        assert "models-cache" not in volumes(pods[name]), name


def test_the_models_volume_is_mounted_read_only_beside_a_shared_cache(render):
    pods = pod_templates(render(MODEL_WEIGHTS))
    for name in LOADERS:
        assert volumes(pods[name])["models"]["persistentVolumeClaim"] == {
            "claimName": "llm-weights",
            "readOnly": True,
        }
        assert mounts(pods[name])["models"] == {"name": "models", "mountPath": "/models", "readOnly": True}
        assert volumes(pods[name])["models-cache"]["persistentVolumeClaim"] == {
            "claimName": "stillhouse-model-cache"
        }


@pytest.mark.parametrize("component", ["teacher", "trainer"])
def test_the_services_look_for_models_where_they_are_mounted(render, component: str):
    variables = env(render(None), component)
    prefix = f"STILLHOUSE_{component.upper()}_MODELS__"
    assert variables[f"{prefix}CACHE_DIR"] == CACHE_PATH
    assert variables[f"{prefix}ROOT"] == "/models"


def test_the_teacher_can_run_its_own_image_on_a_gpu(render):
    manifests = render(MODEL_WEIGHTS)
    teacher = main_container(
        named(manifests, "Deployment", f"{RELEASE}-stillhouse-teacher")["spec"]["template"]
    )
    trainer = main_container(
        named(manifests, "Deployment", f"{RELEASE}-stillhouse-trainer")["spec"]["template"]
    )
    assert teacher["image"] == "ghcr.io/stillhouse-dev/stillhouse:0.1.0-gpu"
    assert trainer["image"] == "ghcr.io/stillhouse-dev/stillhouse:0.1.0"
    assert teacher["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_links_are_signed_for_the_minio_ingress_host(render):
    manifests = render(MODEL_WEIGHTS)
    assert env(manifests, "storage")["STILLHOUSE_STORAGE_OBJECT_STORE__PUBLIC_ENDPOINT"] == (
        "https://s3.stillhouse.example.com"
    )
    ingress = named(manifests, "Ingress", f"{RELEASE}-stillhouse-minio")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "s3.stillhouse.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"] == {
        "name": f"{RELEASE}-stillhouse-minio",
        "port": {"name": "s3"},
    }
    policy = named(manifests, "NetworkPolicy", f"{RELEASE}-stillhouse-minio-ingress")
    assert policy["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ingress-nginx"
    }
    # Only the storage service signs links.
    for component in ("teacher", "trainer", "prompts"):
        assert not any(name.endswith("PUBLIC_ENDPOINT") for name in env(manifests, component))


def test_an_explicit_public_endpoint_wins_and_none_is_set_by_default(render):
    explicit = render(None, ["objectStore.publicEndpoint=https://downloads.example.com:8443"])
    assert env(explicit, "storage")["STILLHOUSE_STORAGE_OBJECT_STORE__PUBLIC_ENDPOINT"] == (
        "https://downloads.example.com:8443"
    )
    default = render(None)
    assert "STILLHOUSE_STORAGE_OBJECT_STORE__PUBLIC_ENDPOINT" not in env(default, "storage")
    assert not [m for m in of_kind(default, "Ingress") if m["metadata"]["name"].endswith("-minio")]


@pytest.mark.parametrize(
    ("override", "complaint"),
    [
        ("objectStore.publicEndpoint=https://s3.example.com/bucket", "publicEndpoint"),
        ("objectStore.publicEndpoint=s3.example.com", "publicEndpoint"),
        ("minio.ingress.enabled=true", "minio.ingress.host is required"),
    ],
)
def test_a_bad_public_endpoint_or_ingress_is_refused(helm, override: str, complaint: str):
    result = helm.template(overrides=[override])
    assert result.returncode != 0
    assert complaint in result.stderr


def test_external_s3_credentials_may_come_from_each_pods_role(render):
    manifests = render(
        CHART / "ci" / "external-storage-values.yaml", ["objectStore.external.credentials=environment"]
    )
    for component in ("prompts", "teacher", "storage", "trainer"):
        variables = env(manifests, component)
        prefix = f"STILLHOUSE_{component.upper()}_OBJECT_STORE__"
        assert variables[f"{prefix}CREDENTIALS"] == "environment"
        assert f"{prefix}ACCESS_KEY" not in variables and f"{prefix}SECRET_KEY" not in variables
    for name, pod in pod_templates(manifests).items():
        names = {entry["name"] for entry in main_container(pod).get("env", [])}
        assert not names & {"STILLHOUSE_OBJECT_STORE_ACCESS_KEY", "STILLHOUSE_OBJECT_STORE_SECRET_KEY"}, name
    # The bundled MinIO has keys only.
    assert "STILLHOUSE_STORAGE_OBJECT_STORE__CREDENTIALS" not in env(
        render(None, ["objectStore.external.credentials=environment"]), "storage"
    )
