"""The Grafana dashboard and the alert rules chart what the server really exports: a server (tiny
models, in this process) serves an encode, a decode, a refused decode and a generation job, and
every metric name and grouping label in their PromQL is checked against its /metrics. Also the
dashboard's layout and its provisioning with the datasource."""
from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient

from coordtok.service.app import create_app
from coordtok.formats.video_write import write_video
from coordtok.service.settings import Settings
from tests.deploy.deployment import (
    DASHBOARD, DOCKER, PROMETHEUS_SERIES, mount, dashboard_queries, exported_series, grouping_labels, metric_names, rule_queries,
)
from tests.service.test_jobs import save_models


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, set[str]]:
    folder = tmp_path_factory.mktemp("monitoring")
    tokenizer, generator = save_models(folder)
    settings = Settings(model=str(tokenizer), generator=str(generator), devices=["cpu"], jobs_dir=folder / "jobs",
                        batch_wait_ms=0, generation_batch_size=2)
    clip = io.BytesIO()
    write_video(np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), clip, fps=8)
    with TestClient(create_app(settings)) as client:
        tokens = client.post("/v1/encode", params={"format": "json"}, content=clip.getvalue(), headers={"content-type": "video/mp4"})
        assert tokens.status_code == 200, tokens.text
        json_tokens = {"content-type": "application/json"}
        assert client.post("/v1/decode", content=tokens.content, headers=json_tokens).status_code == 200
        assert client.post("/v1/decode", content=b"{}", headers=json_tokens).status_code == 422
        job = client.post("/v1/generate", json={"num_videos": 1, "steps": 2, "seed": 1}).json()
        deadline = time.monotonic() + 60
        while client.get(f"/v1/jobs/{job['id']}").json()["status"] != "succeeded":
            assert time.monotonic() < deadline, "the job did not succeed"
            time.sleep(0.05)
        return exported_series(client.get("/metrics").text)


def test_every_metric_the_dashboard_charts_is_exported(exported):
    queries = dashboard_queries()
    assert len(queries) >= 25
    for title, expr in queries:
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        unknown = names - set(exported) - set(PROMETHEUS_SERIES)
        assert not unknown, f"panel {title!r} charts {sorted(unknown)}, which the server does not export"


def test_every_metric_the_alert_rules_use_is_exported(exported):
    for alert, expr in rule_queries():
        names = metric_names(expr)
        assert names and not names - set(exported) - set(PROMETHEUS_SERIES), f"{alert}: {sorted(names)}"


def test_queries_group_by_labels_their_metrics_have(exported):
    for title, expr in dashboard_queries() + rule_queries():
        names = metric_names(expr)
        labels = set().union(*(exported.get(name) or PROMETHEUS_SERIES.get(name, set()) for name in names))
        if any(name in exported and not exported[name] for name in names):
            continue  # a family without samples here (GPU memory on a CPU server): its labels are unseen
        missing = grouping_labels(expr) - labels - {"instance", "job"}
        assert not missing, f"{title!r} groups by {sorted(missing)}, which {sorted(names)} lack"


def test_the_dashboard_charts_what_operators_ask_for():
    exprs = [expr for _, expr in dashboard_queries()]

    def charted(*parts: str) -> bool:
        return any(all(part in expr for part in parts) for expr in exprs)

    assert charted("rate(coordtok_requests_total", "route", "status")  # request rate
    assert charted("histogram_quantile(0.5", "coordtok_request_duration_seconds_bucket", "route")  # p50 by route
    assert charted("histogram_quantile(0.99", "coordtok_request_duration_seconds_bucket", "route")  # p99 by route
    assert charted("coordtok_queue_size")
    assert charted("coordtok_batch_size_")
    assert charted("coordtok_batch_duration_seconds_bucket")  # model time
    assert charted("coordtok_gpu_memory_allocated_bytes") and charted("coordtok_gpu_memory_reserved_bytes")
    assert charted("coordtok_jobs", "status")


def test_the_dashboard_is_laid_out_and_provisioned_with_the_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for panel in panels:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
    (datasource,) = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    for panel in panels:
        for target in [panel, *panel.get("targets", [])]:
            if "datasource" in target:
                assert target["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
    (provider,) = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/coordtok.yml").read_text())["providers"]
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    mounts = dict(map(mount, compose["services"]["grafana"]["volumes"]))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
