"""The Grafana dashboard and the KubeRay scrape config agree with the metrics the code exports and
with the pods rayservice.yaml runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from deployments import metrics

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def exported_names() -> set[str]:
    """The Prometheus names of every modelfleet metric, as Ray exports them."""
    metrics.IngressMetrics()
    metrics.FamilyMetrics("llm")
    names = set()
    for name, metric in metrics._defined.items():
        kind = type(metric).__name__
        if kind == "Counter":
            names.add(f"ray_{name}_total")
        elif kind == "Histogram":
            names |= {f"ray_{name}_bucket", f"ray_{name}_sum", f"ray_{name}_count"}
        else:
            names.add(f"ray_{name}")
    return names


def test_every_dashboard_query_names_an_exported_metric_and_every_metric_is_shown():
    dashboard = json.loads((CLUSTER / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"ray_modelfleet_\w+", expr)}
    exported = exported_names()
    assert used - exported == set(), "the dashboard queries metrics the code does not export"
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exported}
    assert families - shown == set(), "metrics without a panel"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_podmonitor_scrapes_the_metrics_port_of_every_ray_pod():
    monitor = yaml.safe_load((CLUSTER / "podmonitor.yaml").read_text())
    service = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for group in groups:
        labels = group["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        port = int(group["rayStartParams"]["metrics-export-port"])
        container = group["template"]["spec"]["containers"][0]
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert named[endpoint["port"]] == port


def test_networkpolicy_lets_prometheus_reach_the_metrics_port():
    policy = yaml.safe_load((CLUSTER / "networkpolicy.yaml").read_text())
    rules = policy["spec"]["ingress"]
    assert any({"port": 8080, "protocol": "TCP"} in rule.get("ports", []) and rule.get("from") for rule in rules)
