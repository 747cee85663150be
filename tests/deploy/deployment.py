"""The files under docker/ as the tests read them: Dockerfile instructions, compose volumes, the
Grafana dashboard's and the alert rules' PromQL with the metric names and grouping labels in it,
what a server's /metrics exports, and the Prometheus config rendered for a test's server."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]
DASHBOARD = DOCKER / "grafana" / "dashboards" / "coordtok.json"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
RULES = DOCKER / "prometheus" / "rules.yml"
# Grafana's variables in the dashboard's queries, with values that suit a test's short scrape interval.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "15s"}
# Series that Prometheus itself writes for every target.
PROMETHEUS_SERIES = {"up": {"instance", "job"}}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count"),
             "info": ("_info",), "gauge": ("",), "unknown": ("",)}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.MULTILINE)]


def pins() -> dict[str, str]:
    """docker/requirements.txt as {canonical name: version}."""
    lines = (DOCKER / "requirements.txt").read_text().splitlines()
    pairs = [line.split("==") for line in lines if line.strip() and not line.startswith("#")]
    return {canonical(name): version.strip() for name, version in pairs}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def mount(volume: str) -> tuple[str, str]:
    """(source, target) of a compose short-syntax volume; the source may hold ${VAR:-default}."""
    source, target = re.fullmatch(r"(.+):(/[^:]*)(?::ro|:rw)?", volume).groups()
    return source, target


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(panel["title"], target["expr"]) for panel in panels for target in panel.get("targets", [])]


def rule_queries() -> list[tuple[str, str]]:
    """(alert name, PromQL) of every alert rule."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(rule["alert"], rule["expr"]) for group in groups for rule in group["rules"]]


def with_values(expr: str) -> str:
    """The query with Grafana's variables replaced, as Prometheus can run it."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL query selects: identifiers that are not functions, keywords,
    label names or values, grouping labels, durations or numbers."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    bare = re.sub(r"\{[^}]*\}", "", bare)  # label matchers
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # ranges
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", bare):
        name, call = match.groups()
        if not call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def grouping_labels(expr: str) -> set[str]:
    """Labels named in `by (...)` and `without (...)` clauses."""
    labels = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels.update(label.strip() for label in group.split(",") if label.strip())
    return labels


def exported_series(metrics_text: str) -> dict[str, set[str]]:
    """Every series name that a /metrics answer exports or declares (a histogram's _bucket, _sum
    and _count, a counter's _total, ...), with the label names seen on its samples (empty for a
    family declared without samples yet, such as GPU memory on a CPU server)."""
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for suffix in _SUFFIXES.get(family.type, ("",)):
            series.setdefault(family.name + suffix, set())
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def rendered_prometheus_config(target: str, interval_ms: int) -> str:
    """docker/prometheus/prometheus.yml with `target` as the server, `interval_ms` as the scrape
    and evaluation interval, and its rule files as absolute paths."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval=f"{interval_ms}ms", evaluation_interval=f"{interval_ms}ms")
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / path) for path in config["rule_files"]]
    (job,) = config["scrape_configs"]
    del job["dns_sd_configs"]  # Docker's DNS, which names the compose servers, is not here
    job["static_configs"] = [{"targets": [target]}]
    return yaml.safe_dump(config)
