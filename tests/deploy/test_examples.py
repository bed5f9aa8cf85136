"""The platform examples (deploy/helm/stillhouse/examples/) say what they claim: every check over the
values sets runs over them too (conftest.VALUES_SETS); these check each one's point."""

from __future__ import annotations

import ipaddress

from .conftest import RELEASE, VALUES_SETS, of_kind, pod_templates
from .network_model import Endpoint, NetworkModel
from .test_manifests import by_name, endpoints

PREFIX = f"{RELEASE}-stillhouse"


def worker_groups(manifests: list[dict]) -> dict[str, dict]:
    (cluster,) = of_kind(manifests, "RayCluster")
    return {group["groupName"]: group["template"]["spec"] for group in cluster["spec"]["workerGroupSpecs"]}


def annotations_by_account(manifests: list[dict]) -> dict[str, dict]:
    return {
        sa["metadata"]["name"]: sa["metadata"].get("annotations", {})
        for sa in of_kind(manifests, "ServiceAccount")
    }


def test_eks_gives_roles_to_the_ray_pods_and_trainer_and_scales_gpus_from_zero(render) -> None:
    manifests = render(VALUES_SETS["example-eks-values"])
    accounts = annotations_by_account(manifests)
    role = "eks.amazonaws.com/role-arn"
    assert accounts[f"{PREFIX}-ray-worker"][role].endswith(":role/stillhouse-ray")
    assert accounts[f"{PREFIX}-trainer"][role].endswith(":role/stillhouse-trainer")
    assert role not in accounts[f"{PREFIX}-teacher"]
    assert all(a["eks.amazonaws.com/sts-regional-endpoints"] == "true" for a in accounts.values())
    groups = worker_groups(manifests)
    assert groups["gpu"]["nodeSelector"]["karpenter.k8s.aws/instance-gpu-count"] == "8"
    assert groups["a10g"]["nodeSelector"] == {"eks.amazonaws.com/nodegroup": "gpu-a10g"}
    for name, spec in groups.items():
        # The CPU workers of the fanned-out stages have none.
        assert ("nvidia.com/gpu" in spec["containers"][0]["resources"]["requests"]) == (name != "fanout")


def test_gke_uses_workload_identity_and_accelerator_labels(render) -> None:
    manifests = render(VALUES_SETS["example-gke-values"])
    accounts = annotations_by_account(manifests)
    assert len(accounts) == 10
    assert {a["iam.gke.io/gcp-service-account"] for a in accounts.values()} == {
        "stillhouse@acme-ml.iam.gserviceaccount.com"
    }
    groups = worker_groups(manifests)
    assert groups["gpu"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert groups["l4-spot"]["priorityClassName"] == "stillhouse-preemptible"


def test_bare_metal_cilium_reaches_dns_pods_and_the_api_server_nodes(render) -> None:
    manifests = render(VALUES_SETS["example-bare-metal-cilium-values"])
    model = NetworkModel(of_kind(manifests, "NetworkPolicy"))
    points = by_name(endpoints(manifests))
    node_local_dns = Endpoint("node-local-dns", "kube-system", {"k8s-app": "node-local-dns"}, frozenset({53}))
    for name in ("control-plane", "trainer", "ray-head", "ray-worker"):
        assert model.egress_allowed(points[name], node_local_dns, 53, "UDP"), name
        assert not model.egress_allowed(points[name], ipaddress.ip_address("169.254.20.10"), 53, "UDP"), name
    head = points["ray-head"]
    assert model.egress_allowed(head, ipaddress.ip_address("192.0.2.11"), 6443)
    assert not model.egress_allowed(head, ipaddress.ip_address("192.0.2.13"), 6443)
    # The machines' network is private to the teacher.
    assert not model.egress_allowed(points["teacher"], ipaddress.ip_address("192.0.2.50"), 443)
    pods = pod_templates(manifests)
    assert pods[f"RayCluster/{PREFIX}-ray/gpu"]["spec"]["runtimeClassName"] == "nvidia"
