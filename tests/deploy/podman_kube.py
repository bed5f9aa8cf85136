"""Rendered Deployments, ConfigMaps and Secrets (and Jobs to run first) run with `podman kube play` (the
podman of Debian bookworm, 4.3), on the host's network; everything it made is removed again when the
block ends.

podman 4.3 reads the pod specs as they are, with these exceptions, which change no setting of a pod:

- A Secret is not taken from the played YAML but from a podman secret of the same name, and a
  `secretKeyRef` and a secret volume read that podman secret in two different formats: a variable
  reads a JSON object of base64 values (the Secret's `data`), a volume reads a Secret whose `data`
  values it writes into the files verbatim (so they are given decoded). A Secret that is both would
  need both formats and is refused.
- A secret volume without `optional` crashes podman (it dereferences the missing field), so each gets
  `optional: false`, which is what Kubernetes assumes when the field is absent.
- Projected volumes are not supported: one that projects a single whole Secret becomes a secret volume
  of that Secret (the same files); any other projection is refused.
- Secret volumes are named volumes named after their Secret, which `podman kube down` leaves behind.
- Jobs are not supported: a Job's pod is played as a Pod (its template's spec, unchanged).
- On the host's network podman refuses containers with `ports` (it publishes every containerPort,
  which needs a network of its own): they are dropped. A process listens on its port all the same;
  in Kubernetes, too, the list only describes what the process opens.

Not carried over, as podman has no counterpart: the secret volumes' `defaultMode` and the pod's
`fsGroup` (files are root's, mode 0644), gRPC probes and readiness (the tests ask those questions
themselves), scheduling and service accounts.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import yaml
from waiting import wait_until

from .conftest import Manifest
from .services_image import RUNTIME, ULIMITS, podman

JOB_TIMEOUT_S = 600

# `podman inspect` of each played container, by Deployment name and then container name.
Pods = dict[str, dict[str, dict]]


def pod_spec(workload: Manifest) -> dict:
    """The pod spec of a Pod, or of the pods of a Deployment or Job."""
    return workload["spec"] if workload["kind"] == "Pod" else workload["spec"]["template"]["spec"]


def job_pod(job: Manifest) -> Manifest:
    """The pod of a Job, as a Pod: podman 4.3 plays no Job."""
    template = job["spec"]["template"]
    metadata = {"name": job["metadata"]["name"], "labels": template["metadata"].get("labels", {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def secret_uses(workloads: Iterable[Manifest]) -> tuple[set[str], set[str]]:
    """Names of the Secrets the pods read through variables, and those they mount as volumes."""
    by_variable, by_volume = set(), set()
    for workload in workloads:
        spec = pod_spec(workload)
        for container in spec["containers"]:
            for variable in container.get("env", []):
                if ref := variable.get("valueFrom", {}).get("secretKeyRef"):
                    by_variable.add(ref["name"])
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    by_variable.add(source["secretRef"]["name"])
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                by_volume.add(volume["secret"]["secretName"])
            for source in volume.get("projected", {}).get("sources", []):
                if "secret" in source:
                    by_volume.add(source["secret"]["name"])
    return by_variable, by_volume


def podman_secret_payloads(secrets: Iterable[Manifest], workloads: Iterable[Manifest]) -> dict[str, str]:
    """What each podman secret holds, by Secret name, in the format its readers expect (module doc)."""
    by_variable, by_volume = secret_uses(workloads)
    payloads = {}
    for secret in secrets:
        name, data = secret["metadata"]["name"], secret.get("data") or {}
        assert not secret.get("stringData"), f"Secret {name}: podman 4.3 reads only `data`"
        if name in by_variable and name in by_volume:
            pytest.fail(f"Secret {name} is both mounted and read by variables, which podman 4.3 cannot do")
        if name in by_volume:
            decoded = {key: base64.b64decode(value).decode() for key, value in data.items()}
            payloads[name] = json.dumps({**secret, "data": decoded})
        else:
            payloads[name] = json.dumps(data)
    return payloads


def playable(workload: Manifest) -> Manifest:
    """The Deployment or Pod with the changes podman 4.3 needs (module doc), and no other change."""
    played = copy.deepcopy(workload)
    for container in pod_spec(played)["containers"]:
        container.pop("ports", None)
    for volume in pod_spec(played).get("volumes", []):
        if "projected" in volume:
            projection = volume.pop("projected")
            sources = projection["sources"]
            whole_secret = len(sources) == 1 and set(sources[0]) == {"secret"}
            if not whole_secret or set(sources[0]["secret"]) != {"name"}:
                pytest.fail(f"volume {volume['name']}: podman 4.3 cannot project {sources}")
            volume["secret"] = {"secretName": sources[0]["secret"]["name"]}
            if "defaultMode" in projection:
                volume["secret"]["defaultMode"] = projection["defaultMode"]
        if "secret" in volume:
            volume["secret"].setdefault("optional", False)
    return played


def containers_conf(path: Path, hosts_file: Path) -> Path:
    """podman's settings for the played pods: the runtime and limits the sandbox allows (as the other
    image tests pass them on the command line), and the extra /etc/hosts lines of every container."""
    ulimits = ", ".join(json.dumps(limit) for limit in ULIMITS)
    path.write_text(
        f"[containers]\ndefault_ulimits = [{ulimits}]\nbase_hosts_file = {json.dumps(str(hosts_file))}\n"
        f"[engine]\nruntime = {json.dumps(RUNTIME)}\n"
    )
    return path


@contextmanager
def podman_secrets(payloads: dict[str, str], workdir: Path) -> Iterator[None]:
    created = []
    try:
        for name, payload in payloads.items():
            path = workdir / f"secret-{name}.json"
            path.write_text(payload)
            path.chmod(0o600)
            podman("secret", "create", name, str(path))
            created.append(name)
        yield
    finally:
        for name in created:
            podman("secret", "rm", name, check=False)


@contextmanager
def kube_played(
    deployments: list[Manifest],
    config_maps: list[Manifest],
    secrets: list[Manifest],
    host_names: Iterable[str],
    workdir: Path,
    jobs_first: Sequence[Manifest] = (),
) -> Iterator[Pods]:
    """The Deployments running as pods on the host's network, with `host_names` resolving to the
    loopback address, after each of `jobs_first` ran to success (as `helm install` runs pre-install
    hooks). Yields `podman inspect` of the Deployments' containers."""
    hosts = workdir / "hosts"
    hosts.write_text("".join(f"127.0.0.1 {name}\n" for name in host_names))
    env = {**os.environ, "CONTAINERS_CONF": str(containers_conf(workdir / "containers.conf", hosts))}
    kube_yaml = workdir / "workloads.yaml"
    kube_yaml.write_text(yaml.safe_dump_all([*config_maps, *map(playable, deployments)]))
    pods = [f"{deployment['metadata']['name']}-pod-0" for deployment in deployments]
    with ExitStack() as cleanup:
        payloads = podman_secret_payloads(secrets, [*deployments, *jobs_first])
        cleanup.enter_context(podman_secrets(payloads, workdir))
        cleanup.callback(remove_volumes, [s["metadata"]["name"] for s in secrets])
        for job in jobs_first:
            run_to_success(job, config_maps, workdir, env)
        cleanup.callback(remove_pods, pods, kube_yaml, env)
        play(kube_yaml, env)
        yield {
            deployment["metadata"]["name"]: pod_containers(pod)
            for deployment, pod in zip(deployments, pods, strict=True)
        }


def play(kube_yaml: Path, env: dict[str, str]) -> None:
    played = subprocess.run(
        ["podman", "kube", "play", "--network", "host", str(kube_yaml)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert played.returncode == 0, f"podman kube play failed:\n{played.stdout}\n{played.stderr}"


def run_to_success(job: Manifest, config_maps: list[Manifest], workdir: Path, env: dict[str, str]) -> None:
    """Play the Job's pod until its containers exit; fail with their logs unless each exits 0."""
    pod = playable(job_pod(job))
    name = pod["metadata"]["name"]
    kube_yaml = workdir / f"job-{name}.yaml"
    kube_yaml.write_text(yaml.safe_dump_all([*config_maps, pod]))
    try:
        play(kube_yaml, env)
        ids = [container["Id"] for container in pod_containers(name).values()]
        timeout = job["spec"].get("activeDeadlineSeconds", JOB_TIMEOUT_S)
        finished = wait_until(lambda: exited(ids), timeout, f"the Job {name}", interval=1)
        failed = {c["Name"]: c["State"]["ExitCode"] for c in finished if c["State"]["ExitCode"] != 0}
        if failed:
            logs = "\n".join(podman("logs", i, check=False).stdout[-3000:] for i in ids)
            pytest.fail(f"the Job {name} failed: {failed}\n{logs}")
    finally:
        remove_pods([name], kube_yaml, env)


def exited(ids: list[str]) -> list[dict] | None:
    """`podman inspect` of the containers once none of them runs any more."""
    inspected = json.loads(podman("inspect", *ids).stdout)
    return None if any(c["State"]["Running"] for c in inspected) else inspected


def pod_containers(pod: str) -> dict[str, dict]:
    """`podman inspect` of the pod's containers by their name in the pod spec, infra container aside."""
    inspected = json.loads(podman("pod", "inspect", pod).stdout)
    if isinstance(inspected, list):  # podman 5 answers a list, podman 4 one object
        (inspected,) = inspected
    infra = inspected.get("InfraContainerID")
    ids = [c["Id"] for c in inspected.get("Containers", []) if c["Id"] != infra]
    assert ids, f"pod {pod} has no containers: {inspected}"
    return {c["Name"].removeprefix(f"{pod}-"): c for c in json.loads(podman("inspect", *ids).stdout)}


def remove_pods(pods: list[str], kube_yaml: Path, env: dict[str, str]) -> None:
    subprocess.run(["podman", "kube", "down", str(kube_yaml)], capture_output=True, timeout=300, env=env)
    for pod in pods:
        podman("pod", "rm", "--force", pod, check=False, timeout=300)


def remove_volumes(names: list[str]) -> None:
    for name in names:
        podman("volume", "rm", "--force", name, check=False)
