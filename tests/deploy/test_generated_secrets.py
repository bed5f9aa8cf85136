"""Generated Secrets under `helm template`, which cannot read the cluster: derived from
`generatedSecrets.seed`, the same on every render (Tilt, Argo CD); random without a seed by default;
refused with a message naming the values to set when `generatedSecrets.withoutCluster` is fail."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

from .conftest import VALUES_SETS, Helm, Manifest, of_kind

SEED = "0123456789abcdef0123456789abcdef"
GENERATED = {"api-tokens", "service-token", "minio", "postgresql", "ray-auth"}


def generated_secrets(helm: Helm, *overrides: str, values: Path | None = None, **kwargs) -> dict[str, dict]:
    """name suffix -> decoded data of each generated Secret, from a fresh render (no cache)."""
    result = helm.template(values, overrides, **kwargs)
    assert result.returncode == 0, result.stderr
    manifests: list[Manifest] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    secrets = {}
    for secret in of_kind(manifests, "Secret"):
        suffix = secret["metadata"]["name"].removeprefix("demo-stillhouse-")
        if suffix in GENERATED:
            secrets[suffix] = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    return secrets


@pytest.mark.parametrize("values_name", [name for name in VALUES_SETS if name != "default"])
def test_two_renders_of_the_committed_values_give_identical_secrets(helm: Helm, values_name: str) -> None:
    first = generated_secrets(helm, values=VALUES_SETS[values_name])
    assert first
    assert generated_secrets(helm, values=VALUES_SETS[values_name]) == first


def test_tilt_values_generate_every_secret_from_the_seed(helm: Helm) -> None:
    secrets = generated_secrets(helm, values=VALUES_SETS["kind-dev"])
    assert set(secrets) == GENERATED


def test_seeded_values_are_long_distinct_and_hide_the_seed(helm: Helm) -> None:
    secrets = generated_secrets(helm, f"generatedSecrets.seed={SEED}")
    values = [value for data in secrets.values() for value in data.values()]
    assert len(values) == len(set(values)) == 6
    assert all(len(value) >= 20 and SEED not in value for value in values)
    # URL-safe: the PostgreSQL password goes into a database URL.
    assert secrets["postgresql"]["password"].isalnum()
    assert len(secrets["api-tokens"]["tokens"]) == 43


def test_seeded_values_differ_by_seed_release_and_namespace(helm: Helm) -> None:
    base = generated_secrets(helm, f"generatedSecrets.seed={SEED}")
    other_seed = generated_secrets(helm, f"generatedSecrets.seed={SEED[::-1]}")
    other_namespace = generated_secrets(helm, f"generatedSecrets.seed={SEED}", namespace="staging")
    for other in (other_seed, other_namespace):
        assert all(base[name] != other[name] for name in GENERATED)


def test_without_a_seed_each_render_of_the_defaults_is_random(helm: Helm) -> None:
    """The default (withoutCluster: random): `helm template` and `helm lint` of the defaults work, and
    `helm install` keeps the first values through `lookup`; a render without the cluster is not stable."""
    first, second = generated_secrets(helm), generated_secrets(helm)
    assert set(first) == GENERATED
    assert all(first[name] != second[name] for name in GENERATED)


def test_rendering_the_defaults_without_the_cluster_can_be_refused(helm: Helm) -> None:
    result = helm.template(None, ["generatedSecrets.withoutCluster=fail"])
    assert result.returncode != 0
    assert "cannot read the cluster" in result.stderr
    assert "generatedSecrets.seed" in result.stderr
    assert "controlPlane.apiTokens.existingSecret" in result.stderr


@pytest.mark.parametrize(
    ("existing", "named"),
    [
        ([], "controlPlane.apiTokens.existingSecret"),
        (["controlPlane.apiTokens.existingSecret=api"], "serviceToken.existingSecret"),
        (
            ["controlPlane.apiTokens.existingSecret=api", "serviceToken.existingSecret=svc"],
            "minio.existingSecret",
        ),
        (
            [
                "controlPlane.apiTokens.existingSecret=api",
                "serviceToken.existingSecret=svc",
                "minio.existingSecret=minio",
            ],
            "postgresql.existingSecret",
        ),
        (
            [
                "controlPlane.apiTokens.existingSecret=api",
                "serviceToken.existingSecret=svc",
                "minio.existingSecret=minio",
                "postgresql.existingSecret=pg",
            ],
            "rayCluster.authToken=false",
        ),
    ],
)
def test_the_refusal_names_the_next_value_to_set(helm: Helm, existing: list[str], named: str) -> None:
    result = helm.template(None, ["generatedSecrets.withoutCluster=fail", *existing])
    assert result.returncode != 0 and named in result.stderr, result.stderr


def test_nothing_to_generate_renders_without_a_seed(helm: Helm) -> None:
    existing = [
        "controlPlane.apiTokens.existingSecret=api",
        "serviceToken.existingSecret=svc",
        "minio.existingSecret=minio",
        "postgresql.existingSecret=pg",
        "rayCluster.authToken=false",
    ]
    assert generated_secrets(helm, "generatedSecrets.withoutCluster=fail", *existing) == {}


def test_a_short_seed_is_refused(helm: Helm) -> None:
    result = helm.template(None, ["generatedSecrets.seed=short"])
    assert result.returncode != 0 and "/generatedSecrets/seed" in result.stderr
