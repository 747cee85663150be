"""A private PostgreSQL cluster for tests: `initdb` in a temporary folder, `pg_ctl start` on a free
loopback port (its socket in that folder, trust authentication for the user `coordtok`), stopped
and removed afterwards. initdb refuses to run as root, so as root the cluster runs as the
`postgres` user (`runuser`), which owns the folder."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, text

from tests.service.server_process import free_port
from tests.system_tools import require

USER = "coordtok"


def postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, or Debian's /usr/lib/postgresql/VERSION/bin (newest)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3].split(".")[0]))
    return Path(versions[-1]).parent if versions else None


def _as_cluster_user(folder: Path) -> list[str]:
    """The command prefix that runs PostgreSQL's tools: as `postgres` (owning `folder`) when root."""
    if os.geteuid() != 0:
        return []
    require(shutil.which("runuser") and _user_exists("postgres"), "a postgres user and runuser (to run initdb as non-root)",
            "apt-get install postgresql; .ci/run installs it")
    shutil.chown(folder, "postgres", "postgres")
    return ["runuser", "-u", "postgres", "--"]


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@contextmanager
def private_cluster() -> Iterator[str]:
    """Start a cluster; yield the URL of its `postgres` database (postgresql://coordtok@127.0.0.1:PORT/postgres)."""
    binaries = postgres_bin()
    require(binaries, "PostgreSQL's initdb and pg_ctl", "apt-get install postgresql; .ci/run installs it")
    folder = Path(tempfile.mkdtemp(prefix="coordtok-pg-"))  # short: the socket's path must fit 107 bytes
    try:
        prefix = _as_cluster_user(folder)
        data, port = folder / "data", free_port()
        run = lambda *command: subprocess.run([*prefix, *command], check=True, capture_output=True, text=True)  # noqa: E731
        run(str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", USER, "--no-sync")
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        run(str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "server.log"), "-w", "start")
        try:
            yield f"postgresql://{USER}@127.0.0.1:{port}/postgres"
        finally:
            run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def fresh_database(cluster_url: str, name: str) -> str:
    """Create the empty database `name` in the cluster; its URL."""
    engine = create_engine(cluster_url.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return cluster_url.rsplit("/", 1)[0] + f"/{name}"
