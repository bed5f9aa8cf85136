"""The Prometheus Operator objects and the Grafana dashboard: rendered only when turned on, and checked
structurally (kubernetes-validate has no schema for monitoring.coreos.com): each ServiceMonitor and the
PodMonitor scrape ports the pods declare, each alert is complete, the dashboard parses and every panel
queries metrics of the documented names."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from monitoring_queries import (
    CHART,
    METRIC_PREFIXES,
    dashboard,
    dashboard_expressions,
    dashboard_panels,
    promql_metric_names,
    rules_template_metric_names,
)

from .conftest import RELEASE, named, of_kind, pod_templates

MONITORING = CHART / "ci" / "monitoring-values.yaml"
PROCESSES = ["control-plane", "prompts", "teacher", "storage", "trainer"]
DURATION = re.compile(r"^[0-9]+(s|m|h|d)$")


def monitoring_objects(manifests: list[dict]) -> list[dict]:
    return [m for m in manifests if m["apiVersion"].startswith("monitoring.coreos.com/")]


def dashboard_config_maps(manifests: list[dict]) -> list[dict]:
    return [m for m in of_kind(manifests, "ConfigMap") if "stillhouse.json" in m.get("data", {})]


def test_nothing_for_prometheus_operator_or_grafana_by_default(render) -> None:
    manifests = render(None)
    assert monitoring_objects(manifests) == []
    assert dashboard_config_maps(manifests) == []


@pytest.mark.parametrize(
    ("flag", "kinds"),
    [
        ("metrics.serviceMonitor.enabled", ["ServiceMonitor"] * 5),
        ("metrics.rayPodMonitor.enabled", ["PodMonitor"]),
        ("metrics.prometheusRule.enabled", ["PrometheusRule"]),
    ],
)
def test_each_monitoring_object_renders_only_when_turned_on(render, flag: str, kinds: list[str]) -> None:
    assert sorted(m["kind"] for m in monitoring_objects(render(None, [f"{flag}=true"]))) == kinds


def test_the_ray_pod_monitor_needs_the_ray_cluster(render) -> None:
    without_ray = ["rayCluster.enabled=false", "trainer.externalRayAddress=http://ray:8265"]
    assert monitoring_objects(render(None, ["metrics.rayPodMonitor.enabled=true", *without_ray])) == []


def test_the_dashboard_ships_as_a_config_map_for_the_grafana_sidecar(render) -> None:
    (config_map,) = dashboard_config_maps(render(MONITORING))
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert json.loads(config_map["data"]["stillhouse.json"]) == dashboard()


def test_every_process_has_a_metrics_port_that_its_service_monitor_scrapes(render) -> None:
    manifests = render(MONITORING)
    for process in PROCESSES:
        monitor = named(manifests, "ServiceMonitor", f"{RELEASE}-stillhouse-{process}")
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["distil"]}
        selector = monitor["spec"]["selector"]["matchLabels"]
        (service,) = [
            s for s in of_kind(manifests, "Service") if selector.items() <= s["metadata"]["labels"].items()
        ]
        (endpoint,) = monitor["spec"]["endpoints"]
        assert DURATION.match(endpoint["interval"])
        (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
        pod = named(manifests, "Deployment", service["metadata"]["name"])["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        (declared,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
        assert f"--metrics-port={declared['containerPort']}" in container["args"], process


def test_annotation_based_scrapers_find_every_process_on_its_metrics_port(rendered: list[dict]) -> None:
    for process in PROCESSES:
        pod = named(rendered, "Deployment", f"{RELEASE}-stillhouse-{process}")["spec"]["template"]
        annotations = pod["metadata"]["annotations"]
        (port,) = [p for p in pod["spec"]["containers"][0]["ports"] if p["name"] == "metrics"]
        assert annotations["prometheus.io/scrape"] == "true", process
        assert annotations["prometheus.io/port"] == str(port["containerPort"]), process
        assert annotations["prometheus.io/path"] == "/metrics", process


def test_the_control_plane_metrics_port_is_not_its_api_port(render) -> None:
    manifests = render(None, ["metrics.controlPlanePort=9100"])
    container = named(manifests, "Deployment", f"{RELEASE}-stillhouse-control-plane")["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in container["spec"]["containers"][0]["ports"]}
    assert ports == {"http": 8080, "metrics": 9100}


def test_the_ray_pod_monitor_scrapes_the_ports_ray_serves_its_metrics_on(render) -> None:
    manifests = render(MONITORING)
    (monitor,) = of_kind(manifests, "PodMonitor")
    selector = monitor["spec"]["selector"]
    (components,) = selector["matchExpressions"]
    cluster = of_kind(manifests, "RayCluster")[0]["spec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
    scraped = {endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]}
    ports_by_component = {}
    for pod in pod_templates(manifests).values():
        labels = pod["metadata"]["labels"]
        if (
            selector["matchLabels"].items() <= labels.items()
            and labels[components["key"]] in components["values"]
        ):
            ports = {
                p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])
            }
            ports_by_component[labels[components["key"]]] = ports
    assert set(ports_by_component) == {"ray-head", "ray-worker", "ray-cpu-worker"}
    assert (
        ports_by_component["ray-head"].items()
        >= {"metrics": 8080, "as-metrics": 44217, "dash-metrics": 44227}.items()
    )
    assert ports_by_component["ray-worker"]["metrics"] == 8080
    assert ports_by_component["ray-cpu-worker"]["metrics"] == 8080
    assert scraped == set(ports_by_component["ray-head"]) & {"metrics", "as-metrics", "dash-metrics"}


def rule_objects(manifests: list[dict]) -> list[dict]:
    (rule,) = of_kind(manifests, "PrometheusRule")
    return [entry for group in rule["spec"]["groups"] for entry in group["rules"]]


def test_every_alert_is_complete(render) -> None:
    rules = rule_objects(render(MONITORING))
    assert {rule["alert"] for rule in rules} == {
        "StillhouseJobsFailed",
        "StillhouseStageStalled",
        "StillhouseTeacherErrors",
        "StillhouseTeacherBudgetNearlySpent",
        "StillhouseTeacherSpendHigh",
        "StillhouseGpuWorkersPending",
    }
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert "for" not in rule or DURATION.match(rule["for"])
        expression = rule["expr"]
        assert expression.count("(") == expression.count(")") and expression.count("{") == expression.count(
            "}"
        )
        assert 'namespace="distil"' in expression, rule["alert"]


def test_alert_thresholds_come_from_the_values(render, tmp_path) -> None:
    thresholds = {"stalledStageMinutes": 45, "teacherErrorRatio": 0.25, "gpuWorkersPendingFor": "20m"}
    values = tmp_path / "thresholds.yaml"
    values.write_text(yaml.safe_dump({"metrics": {"prometheusRule": {"enabled": True, **thresholds}}}))
    rules = {rule["alert"]: rule for rule in rule_objects(render(values))}
    assert rules["StillhouseStageStalled"]["expr"].endswith("> 2700")
    assert rules["StillhouseTeacherErrors"]["expr"].endswith("> 0.25")
    assert rules["StillhouseGpuWorkersPending"]["for"] == "20m"
    assert 'NodeType="gpu"' in rules["StillhouseGpuWorkersPending"]["expr"]
    # The spend alert is there only with a threshold.
    assert "StillhouseTeacherSpendHigh" not in rules


def test_the_rendered_alerts_query_what_the_template_names(render) -> None:
    """The names the process-level check reads from the template are those the rendered alerts query."""
    rendered = set().union(*(promql_metric_names(rule["expr"]) for rule in rule_objects(render(MONITORING))))
    assert rendered and all(name.startswith(METRIC_PREFIXES) for name in rendered), rendered
    assert rendered <= rules_template_metric_names()


def test_the_dashboard_parses_and_every_panel_queries_known_metrics() -> None:
    document = dashboard()
    assert document["uid"] == "stillhouse"
    panels = dashboard_panels(document)
    assert len(panels) >= 10
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = promql_metric_names(target["expr"])
            assert names and all(name.startswith(METRIC_PREFIXES) for name in names), panel["title"]
            assert 'namespace="$namespace"' in target["expr"], panel["title"]
    assert dashboard_expressions()


def test_the_readme_documents_every_queried_metric() -> None:
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"`((?:stillhouse|ray|autoscaler)_[a-z0-9_]+)`", readme))
    queried = rules_template_metric_names() | {
        re.sub(r"_(bucket|count|sum)$", "", name)
        for expression in dashboard_expressions()
        for name in promql_metric_names(expression)
    }
    assert queried <= documented, sorted(queried - documented)


def test_the_monitoring_values_set_turns_everything_on() -> None:
    values = yaml.safe_load(MONITORING.read_text())["metrics"]
    assert all(values[block]["enabled"] for block in values)
