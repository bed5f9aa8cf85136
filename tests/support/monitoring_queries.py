"""The metric names the chart's alerts and Grafana dashboard query, and the names a process's /metrics
exposes, for the checks that every queried metric exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "stillhouse"
DASHBOARD = CHART / "dashboards" / "stillhouse.json"
RULES_TEMPLATE = CHART / "templates" / "prometheusrule.yaml"

# Every metric the chart queries starts with one of these: Stillhouse's own, then Ray's and its autoscaler's.
METRIC_PREFIXES = ("stillhouse_", "ray_", "autoscaler_")
# The metrics of Ray (2.60) that the alerts and dashboard use: served by Ray itself (`ray_*` on the
# metrics-export-port of every Ray pod, `autoscaler_*` by the autoscaler on the head), not by a Stillhouse
# process, so no Stillhouse registry has them.
RAY_METRICS = frozenset(
    {"ray_resources", "ray_node_gpus_utilization", "autoscaler_pending_nodes", "autoscaler_active_nodes"}
)

_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
)
# Not the unit of a number (5m, 1e3): an identifier starts where no digit or name character precedes it.
_IDENTIFIER = re.compile(r"(?<![0-9A-Za-z_:.])[a-zA-Z_:][a-zA-Z0-9_:]*")


def promql_metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, aggregations,
    keywords, label names (in matchers and `by (...)` lists), strings or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expression)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        following = text[match.end() :].lstrip()[:1]
        if following != "(" and match.group() not in _KEYWORDS and not match.group().isdigit():
            names.add(match.group())
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(document: dict) -> list[dict]:
    """The panels that show data (rows only group them), nested rows included."""
    panels = []
    for panel in document["panels"]:
        if panel["type"] == "row":
            panels += [inner for inner in panel.get("panels", []) if inner["type"] != "row"]
        else:
            panels.append(panel)
    return panels


def dashboard_expressions() -> list[str]:
    return [target["expr"] for panel in dashboard_panels(dashboard()) for target in panel["targets"]]


def rules_template_metric_names() -> set[str]:
    """The metric names in the PrometheusRule template, with every optional alert (read from the template
    itself, so that no values set hides one)."""
    return set(re.findall(r"\b(?:stillhouse|ray|autoscaler)_[a-z0-9_]+\b", RULES_TEMPLATE.read_text()))


def queried_metric_names() -> set[str]:
    names = rules_template_metric_names()
    for expression in dashboard_expressions():
        names |= promql_metric_names(expression)
    return names


def metric_samples(exposition: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics text by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def exposed_metric_names(exposition: str) -> set[str]:
    """The series names a /metrics text can hold: every sample's, and for each declared family (with or
    without samples yet) its name, and a histogram's _bucket, _count and _sum."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names
