"""docker/compose.yaml's `many` profile without a Docker engine: PostgreSQL, two servers on its one
job queue and one results volume, and nginx in front of exactly those servers on the server port."""
import re

import yaml

from tests.deploy.deployment import DOCKER, mount


def test_the_many_profile_puts_two_servers_on_one_queue_behind_one_port():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = {name: s for name, s in compose["services"].items() if "many" in s.get("profiles", [])}
    servers = {name: s for name, s in services.items() if name.startswith("coordtok-")}
    assert len(servers) == 2 and {"postgres", "proxy"} <= set(services)
    postgres = services["postgres"]["environment"]
    url = f"postgresql://{postgres['POSTGRES_USER']}:${{COORDTOK_DB_PASSWORD:-coordtok}}@postgres:5432/{postgres['POSTGRES_DB']}"
    assert postgres["POSTGRES_PASSWORD"] == "${COORDTOK_DB_PASSWORD:-coordtok}"
    for server in servers.values():
        assert server["environment"]["COORDTOK_JOBS_DB"] == url
        assert "ports" not in server and server["depends_on"]["postgres"]["condition"] == "service_healthy"
        data = {target: source for source, target in map(mount, server["volumes"])}
        assert data["/data"] in compose["volumes"] and server["environment"]["COORDTOK_RESULTS_DIR"].startswith("/data/")
    assert len({tuple(server["volumes"]) for server in servers.values()}) == 1  # the same results for both

    proxy = services["proxy"]
    config = {target: source for source, target in map(mount, proxy["volumes"])}["/etc/nginx/conf.d/default.conf"]
    upstreams = re.findall(r"^\s*server\s+([\w-]+):8000\b", (DOCKER / config).read_text(), re.MULTILINE)
    assert sorted(upstreams) == sorted(servers)
    assert proxy["ports"] == ["${COORDTOK_HTTP_PORT:-8000}:8000"] and "listen 8000;" in (DOCKER / config).read_text()
