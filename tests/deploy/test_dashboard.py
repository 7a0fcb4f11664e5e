"""The Grafana dashboard: loadable JSON, the panels the issue asks for, and only metrics the service exports."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.deploy.conftest import CHART, ROOT, render

DASHBOARD = CHART / "files" / "engram-dashboard.json"


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def expressions() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def test_dashboard_has_the_required_panels() -> None:
    titles = {panel["title"] for panel in dashboard()["panels"]}
    assert {
        "History loads by outcome",
        "History load miss ratio",
        "History load latency",
        "Turn latency",
        "Requests by replica",
        "Redis errors",
    } <= titles
    ids = [panel["id"] for panel in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard()["uid"] == "engram-overview"


def test_dashboard_queries_use_bounded_labels_and_the_datasource_variable() -> None:
    for panel in dashboard()["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
    joined = "\n".join(expressions())
    assert 'outcome="miss"' in joined and "sum by (pod)" in joined and "histogram_quantile(0.99" in joined
    for expr in expressions():
        assert expr.count("(") == expr.count(")"), expr


def exported_metric_names() -> set[str]:
    source = "\n".join(path.read_text() for path in (ROOT / "service" / "engram").rglob("*.py"))
    if "prometheus_client" not in source:
        pytest.skip("the service defines no metrics yet")
    names = set(re.findall(r"\"(engram_[a-z0-9_]+)\"", source))
    # prometheus_client appends _total to counters declared without it.
    return names | {f"{name}_total" for name in names}


def test_dashboard_queries_only_metrics_the_service_exports() -> None:
    exported = exported_metric_names()
    for expr in expressions():
        for series in re.findall(r"\b(engram_[a-z0-9_]+)", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", series)
            assert series in exported or base in exported, f"{series} is not exported by the service"


def test_dashboard_configmap_is_labelled_for_grafanas_sidecar() -> None:
    configmap = render().one("ConfigMap", "engram-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["engram.json"]) == dashboard()
