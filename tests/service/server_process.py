"""A real server in a subprocess on a free loopback port, for the tests that need one over HTTP
(the playground in Chromium, Prometheus scraping it, the images' entry point)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(log: Path, env: dict[str, str] | None = None, command: list[str] | None = None,
                   port: int | None = None, cwd: Path = ROOT, timeout_s: float = 120) -> Iterator[str]:
    """Start `coordtok serve` (or `command`, which must listen on `port`) on 127.0.0.1, wait until
    /readyz answers 200 and yield the server's URL; the server is stopped afterwards. Its output
    goes to `log`, shown when it fails to start."""
    with server_process(log, env, command, port, cwd, timeout_s) as (url, _):
        yield url


@contextmanager
def server_process(log: Path, env: dict[str, str] | None = None, command: list[str] | None = None,
                   port: int | None = None, cwd: Path = ROOT, timeout_s: float = 120) -> Iterator[tuple[str, subprocess.Popen]]:
    """As `running_server`, yielding (URL, the server's process) for tests that read its memory."""
    port = port or free_port()
    command = command or [sys.executable, "-m", "coordtok.service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "COORDTOK_DEVICES": '["cpu"]', "COORDTOK_LOG_FORMAT": "text",
                   "COORDTOK_BATCH_WAIT_MS": "0", **(env or {})}
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as output:
        server = subprocess.Popen(command, env=environment, cwd=cwd,
                                  stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if server.poll() is not None:
                raise AssertionError(f"the server exited with {server.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the server was not ready within {timeout_s} s:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield url, server
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=30)


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak resident memory) of process `pid`, in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


@contextmanager
def peak_growth(pid: int) -> Iterator[dict[str, float]]:
    """Measure how far process `pid`'s resident memory peaks above its level at the start of the
    block: the peak (VmHWM) is reset first (Linux's clear_refs 5); `growth_mb` is set at the end."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    result = {"before_mb": memory_mb(pid)["VmRSS"]}
    yield result
    now = memory_mb(pid)
    result.update(peak_mb=now["VmHWM"], after_mb=now["VmRSS"], growth_mb=now["VmHWM"] - result["before_mb"])
