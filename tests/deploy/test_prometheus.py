"""Prometheus for real: Debian's `prometheus` scrapes a `coordtok serve` subprocess (tiny model) with
the project's docker/prometheus/prometheus.yml (its target and interval replaced) and alert rules;
the main series arrive and move after requests, and every dashboard query runs. Skipped without
the binary outside CI only: .ci/run installs it."""
from __future__ import annotations

import io
import shutil
import subprocess
import time

import httpx
import numpy as np
import yaml

from coordtok.formats.video_write import write_video
from tests.deploy.deployment import RULES, PROMETHEUS_CONFIG, dashboard_queries, rendered_prometheus_config, with_values
from tests.service.server_process import free_port, running_server
from tests.service.test_jobs import save_models
from tests.system_tools import require

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def require_prometheus() -> None:
    require(PROMETHEUS and PROMTOOL, "Debian's prometheus package", "apt-get install prometheus; .ci/run installs it")


def test_promtool_accepts_the_config_and_rules():
    require_prometheus()
    for check in (["check", "config", str(PROMETHEUS_CONFIG)], ["check", "rules", str(RULES)]):
        result = subprocess.run([PROMTOOL, *check], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_server_alerts_fire_when_a_server_stops_answering_or_none_is_found(tmp_path):
    """promtool's rule tests on rules.yml: a target that fails its scrapes (up 0) raises
    CoordTokDown after 2 minutes; once the last server has left the targets (a stopped container
    leaves Docker's DNS, so its series goes stale), CoordTokNoServer fires; while one answers it does not."""
    require_prometheus()
    down = {"alertname": "CoordTokDown", "exp_alerts": [{
        "exp_labels": {"severity": "critical", "job": "coordtok", "instance": "b:8000"},
        "exp_annotations": {"summary": "b:8000 does not answer /metrics"}}]}
    none = {"alertname": "CoordTokNoServer", "exp_alerts": [{
        "exp_labels": {"severity": "critical", "job": "coordtok"},
        "exp_annotations": {"summary": "Prometheus finds no CoordTok server (the name coordtok resolves to none)"}}]}
    tests = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": 'up{job="coordtok", instance="a:8000"}', "values": "1x5 stale"},
                         {"series": 'up{job="coordtok", instance="b:8000"}', "values": "1 0x5 stale"}],
        "alert_rule_test": [
            {"eval_time": "2m", "alertname": "CoordTokDown"},  # pending: down for 1 minute
            down | {"eval_time": "4m"},
            {"eval_time": "5m", "alertname": "CoordTokNoServer"},  # a still answers
            {"eval_time": "7m", "alertname": "CoordTokNoServer"},  # gone for 1 minute: pending
            none | {"eval_time": "9m"},
        ]}]}
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests))
    result = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "alerts_test.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def query(prometheus: str, promql: str) -> list[dict]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}).json()
    assert answer["status"] == "success", (promql, answer)
    return answer["data"]["result"]


def wait_for(prometheus: str, promql: str, accept=bool, timeout_s: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        result = query(prometheus, promql)
        if accept(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{promql}: {result} after {timeout_s} s")
        time.sleep(0.25)


def encodes_counted(prometheus: str) -> float:
    result = query(prometheus, 'sum(coordtok_requests_total{route="/v1/encode",status="200"})')
    return float(result[0]["value"][1]) if result else 0.0


def test_prometheus_scrapes_the_server_with_the_projects_config(tmp_path):
    require_prometheus()
    tokenizer, _ = save_models(tmp_path)
    clip = io.BytesIO()
    write_video(np.random.default_rng(1).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), clip, fps=8)
    env = {"COORDTOK_MODEL": str(tokenizer), "COORDTOK_GENERATOR": "none", "COORDTOK_JOBS_DIR": str(tmp_path / "jobs")}
    with running_server(tmp_path / "server.log", env) as url:
        target = url.removeprefix("http://")
        config = tmp_path / "prometheus.yml"
        config.write_text(rendered_prometheus_config(target, interval_ms=500))
        port = free_port()
        prometheus = f"http://127.0.0.1:{port}"
        with open(tmp_path / "prometheus.log", "w") as log:
            process = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                       stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
                try:
                    if httpx.get(f"{prometheus}/-/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "Prometheus did not start"
                time.sleep(0.1)

            wait_for(prometheus, 'up{job="coordtok"} == 1')
            assert [r["value"][1] for r in wait_for(prometheus, "coordtok_ready")] == ["1"]
            send = lambda: httpx.post(f"{url}/v1/encode", content=clip.getvalue(), headers={"content-type": "video/mp4"}, timeout=60)
            assert send().status_code == 200
            wait_for(prometheus, 'coordtok_requests_total{route="/v1/encode"}')
            before = encodes_counted(prometheus)
            for _ in range(3):
                assert send().status_code == 200
            wait_for(prometheus, 'sum(coordtok_requests_total{route="/v1/encode",status="200"})',
                     lambda r: bool(r) and float(r[0]["value"][1]) >= before + 3)
            for series in ('coordtok_request_duration_seconds_bucket{route="/v1/encode"}', "coordtok_queue_size",
                           'coordtok_batch_size_count{kind="encode"}', 'coordtok_batch_duration_seconds_bucket{kind="encode"}',
                           "coordtok_model_load_seconds", "coordtok_jobs"):
                assert query(prometheus, series), f"Prometheus has no {series}"

            # Every dashboard query is valid PromQL, and the request charts have data.
            for title, expr in dashboard_queries():
                query(prometheus, with_values(expr))
            charts = dict(dashboard_queries())
            for title in ("Request rate by route and status", "Latency p99 by route", "Model time per batch"):
                assert query(prometheus, with_values(charts[title])), f"the panel {title!r} would be empty"
            rules = httpx.get(f"{prometheus}/api/v1/rules").json()["data"]["groups"]
            assert [rule["health"] for group in rules for rule in group["rules"]] == ["ok"] * 7
        finally:
            process.terminate()
            process.wait(timeout=30)
