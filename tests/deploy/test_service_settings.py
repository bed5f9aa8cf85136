"""The chart configures each process with settings the process actually has: every STILLHOUSE_* variable
of a Deployment names a field of that service's settings class, and the settings load from exactly
that environment (Secret references stand in as placeholder values) and the container's arguments, and
read the mounted certificate exactly where mutual TLS is turned on."""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from .conftest import RELEASE, internal_tls_enabled, named

SERVICES = {
    "control-plane": ("stillhouse.control_plane.config", "ControlPlaneSettings"),
    "prompts": ("stillhouse.prompts.config", "PromptsSettings"),
    "teacher": ("stillhouse.teacher.config", "TeacherSettings"),
    "storage": ("stillhouse.storage.config", "StorageSettings"),
    "trainer": ("stillhouse.trainer.config", "TrainerSettings"),
}
REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
# The stages the chart fans out over the RayCluster's CPU workers: their services get
# STILLHOUSE_<SERVICE>_FANOUT__* (the `fanout` settings), and the workers their settings' variables.
FANOUT_SERVICES = ("teacher", "prompts")


def container_environment(container: dict) -> dict[str, str]:
    """The environment Kubernetes gives the container: $(VAR) expanded, Secrets as placeholders."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = REFERENCE.sub(lambda match: env.get(match[1], match[0]), entry["value"])
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = f"secret-{ref['name']}-{ref['key']}"
    return env


def unknown_setting(settings_class: type[BaseModel], prefix: str, variable: str) -> str | None:
    """Why `variable` names no setting (pydantic-settings silently ignores such variables), or None."""
    model: type[BaseModel] | None = settings_class
    for part in variable.removeprefix(prefix).lower().split("__"):
        if model is None or part not in model.model_fields:
            return f"{variable}: {part!r} is not a setting of {settings_class.__name__}"
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return None


def flags(args: list[str]) -> dict[str, str]:
    return {arg[2:].split("=", 1)[0].replace("-", "_"): arg.split("=", 1)[1] for arg in args if "=" in arg}


@pytest.mark.parametrize("service", list(SERVICES))
def test_settings_load_from_the_chart_environment(
    rendered: list[dict], values_set: tuple[str, Path | None], service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, class_name = SERVICES[service]
    settings_class = getattr(importlib.import_module(module), class_name)
    prefix = settings_class.model_config["env_prefix"]
    deployment = named(rendered, "Deployment", f"{RELEASE}-stillhouse-{service}")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == service
    env = container_environment(container)
    ours = {name: value for name, value in env.items() if name.startswith(prefix)}
    problems = [problem for name in ours if (problem := unknown_setting(settings_class, prefix, name))]
    assert not problems

    for name in [name for name in os.environ if name.startswith("STILLHOUSE_")]:
        monkeypatch.delenv(name)
    for name, value in ours.items():
        monkeypatch.setenv(name, value)
    settings = settings_class.load(None, **flags(container["args"][1:]))

    assert settings.host == "0.0.0.0"
    assert settings.service_token_file is not None
    assert not getattr(settings, "reflection", False)
    assert not getattr(settings, "allow_unauthenticated_calls", False)
    assert settings.port == next(p["containerPort"] for p in container["ports"])
    tls_files = (settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file)
    if internal_tls_enabled(values_set):
        assert [path.name for path in tls_files if path] == ["tls.crt", "tls.key", "ca.crt"]
    else:
        assert tls_files == (None, None, None)
    if hasattr(settings, "object_store"):
        assert settings.object_store.backend == "s3"
        assert settings.object_store.secret_key.get_secret_value().startswith("secret-")
    if service in FANOUT_SERVICES:
        fanout = settings.fanout
        assert fanout.ray_address == "http://demo-stillhouse-ray-head-svc.distil.svc:8265"
        assert fanout.ray_auth_token_file is not None
        assert fanout.min_rows >= 1 and fanout.shard_rows >= 1 and fanout.max_parallel_shards >= 1
        assert fanout.cpus_per_shard > 0 and fanout.max_retries >= 0
        assert fanout.shard_resource == "stillhouse_shard_cpu"


@pytest.mark.parametrize("service", FANOUT_SERVICES)
def test_the_cpu_workers_hold_the_settings_of_the_shards(
    rendered: list[dict], values_set: tuple[str, Path | None], service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard on a CPU worker reads TeacherSettings() or PromptsSettings() from the worker's
    environment: every variable names a setting, and they load into the service's own configuration."""
    module, class_name = SERVICES[service]
    settings_class = getattr(importlib.import_module(module), class_name)
    prefix = settings_class.model_config["env_prefix"]
    (cluster,) = [m for m in rendered if m["kind"] == "RayCluster"]
    (group,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "fanout"]
    (container,) = group["template"]["spec"]["containers"]
    env = container_environment(container)
    ours = {name: value for name, value in env.items() if name.startswith(prefix)}
    assert ours, f"the CPU workers get no {prefix}* variables"
    assert not [problem for name in ours if (problem := unknown_setting(settings_class, prefix, name))]
    assert not [name for name in ours if "_FANOUT__" in name], "the shards do not fan out again"

    for name in [name for name in os.environ if name.startswith("STILLHOUSE_")]:
        monkeypatch.delenv(name)
    for name, value in ours.items():
        monkeypatch.setenv(name, value)
    settings = settings_class.load(None)

    assert settings.object_store.backend == "s3"
    assert settings.object_store.secret_key.get_secret_value().startswith("secret-")
    if service == "teacher":
        assert settings.cache_url.startswith("postgresql://") or settings.cache_url.startswith("secret-")
        assert settings.api_key_dir is not None
    else:
        assert settings.teacher_address == "demo-stillhouse-teacher:50052"
        assert settings.service_token_file is not None
        tls_files = (settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file)
        assert all(tls_files) == internal_tls_enabled(values_set)
