"""Load and leak test of a CoordTok server: statuses and latency at rising concurrency, and the
server's resident memory over thousands of requests.

    python benchmarks/load.py --json benchmarks/results/load_cpu.json        # starts its own server
    python benchmarks/load.py --url http://localhost:8000 --pid 1234           # a running one

Without --url, a server is started as a subprocess (`coordtok serve`, default settings) with a
micro CoordTok (8 frames of 16x16, random weights; `--model` for another), so that thousands of
requests take minutes on a CPU and the numbers are about the server rather than the model.

The workload: each client alternates an encode of a short clip (16 frames, 32x32 H.264) and a
decode of its tokens to MP4. A client refused with 503 waits `--retry-wait-s` before its next
request. Two phases:

1. leak: `--leak-requests` (2,000) requests by 8 clients; the server's resident memory (VmRSS) is
   read every 200 requests; the check is that after 2,000 it is within `--leak-margin-mb` of its
   value after 200.
2. levels: at each concurrency (1, 4, 16, 64) for `--seconds` each: requests/s, statuses (only
   200 and the documented 503 of a full queue are expected), p50/p99 latency of the answered
   requests per route.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table, write_json  # noqa: E402

TOKENS_TYPE = "application/vnd.coordtok.tokens+safetensors"


def micro_model(path: Path) -> Path:
    """A CoordTok of 8 frames at 16x16 (the service tests' config), random weights, seeded."""
    import torch

    from coordtok.model import CoordTok, CoordTokConfig, save_model

    config = CoordTokConfig(
        frames=8, height=16, width=16, enc_dim=32, enc_heads=2, enc_patch_t=4, enc_patch_xy=8, enc_vit_layers=1,
        enc_cross_layers=1, latent_res_xy=4, latent_res_t=8, latent_channels=4, latent_patch_xy=2, latent_patch_t=4,
        dec_dim=32, dec_heads=2, dec_layers=1, dec_patch_xy=4, decode_slice_frames=4,
    )
    torch.manual_seed(0)
    save_model(CoordTok(config), path)
    return path


def short_clip(frames: int = 16, size: int = 32) -> bytes:
    from coordtok.formats.video_write import write_video

    t = np.arange(frames)[:, None, None, None]
    y, x = np.arange(size)[None, :, None, None], np.arange(size)[None, None, :, None]
    clip = (127 + 100 * np.sin(0.3 * x + 0.2 * y - 0.4 * t + np.array([0, 2, 4]))).astype(np.uint8)
    buffer = io.BytesIO()
    write_video(clip, buffer, fps=16)
    return buffer.getvalue()


def resident_mb(pid: int) -> float:
    """VmRSS of process `pid` in MiB (Linux /proc; psutil elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def start_server(model: str, folder: Path) -> tuple[subprocess.Popen, str, Path]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = folder / "server.log"
    env = {**os.environ, "COORDTOK_DEVICES": '["cpu"]', "COORDTOK_JOBS_DIR": str(folder / "jobs")}
    server = subprocess.Popen([sys.executable, "-m", "coordtok.service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--model", model, "--generator", "none"], env=env, cwd=ROOT,
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return server, url, log
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"the server did not become ready; see {log}")


class Workload:
    """Clients that alternate encode and decode, recording (route, status, seconds)."""

    def __init__(self, url: str, clip: bytes, tokens: bytes, retry_wait_s: float) -> None:
        self.url, self.clip, self.tokens, self.retry_wait_s = url, clip, tokens, retry_wait_s
        self.records: list[tuple[str, int, float]] = []
        self.transport_errors: Counter = Counter()

    async def one(self, http: httpx.AsyncClient, k: int) -> None:
        route, body, kind = (("/v1/encode", self.clip, "video/mp4") if k % 2 == 0 else
                             ("/v1/decode", self.tokens, TOKENS_TYPE))
        started = time.perf_counter()
        try:
            status = (await http.post(route, content=body, headers={"content-type": kind})).status_code
        except httpx.TransportError as error:
            status = 0  # no answer at all (a dropped connection): shown as status 0
            self.transport_errors[f"{type(error).__name__}: {error}"] += 1
        self.records.append((route, status, time.perf_counter() - started))
        if status == 503:
            await asyncio.sleep(self.retry_wait_s)

    async def run(self, clients: int, requests: int | None = None, seconds: float | None = None,
                  on_count=None) -> None:
        """`clients` concurrent loops until `requests` requests are done or `seconds` have passed."""
        deadline = time.perf_counter() + seconds if seconds else float("inf")
        counter = iter(range(requests if requests is not None else 10**12))

        async def client(http: httpx.AsyncClient) -> None:
            for k in counter:
                if time.perf_counter() >= deadline:
                    return
                await self.one(http, k)
                if on_count is not None:
                    on_count(k + 1)

        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)  # httpx's idle expiry: 5 s
        async with httpx.AsyncClient(base_url=self.url, timeout=300, limits=limits) as http:
            await asyncio.gather(*(client(http) for _ in range(clients)))


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] if sorted_values else float("nan")


def measure_leak(work: Workload, pid: int | None, requests: int, margin_mb: float) -> dict:
    """`requests` requests by 8 clients, the server's resident memory sampled every 200."""
    memory: dict[int, float] = {}

    def sample(done: int) -> None:
        if pid is not None and done % 200 == 0:
            memory[done] = round(resident_mb(pid), 1)

    started = time.perf_counter()
    asyncio.run(work.run(8, requests=requests, on_count=sample))
    statuses = Counter(status for _, status, _ in work.records)
    leak = {"requests": len(work.records), "clients": 8, "seconds": round(time.perf_counter() - started, 1),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "rss_mb_every_200": memory}
    if 200 in memory and requests in memory:
        growth = memory[requests] - memory[200]
        leak.update(rss_mb_after_200=memory[200], rss_mb_after_last=memory[requests],
                    growth_mb=round(growth, 1), margin_mb=margin_mb, within_margin=growth <= margin_mb)
    return leak


def measure_level(work: Workload, clients: int, seconds: float, pid: int | None) -> list[dict]:
    """One row per route: `clients` clients alternating encode and decode for `seconds`."""
    work.records = []
    started = time.perf_counter()
    asyncio.run(work.run(clients, seconds=seconds))
    elapsed = time.perf_counter() - started
    rows = []
    for route in ("/v1/encode", "/v1/decode"):
        records = [r for r in work.records if r[0] == route]
        statuses = Counter(status for _, status, _ in records)
        answered = sorted(seconds for _, status, seconds in records if status == 200)
        rows.append({
            "clients": clients, "route": route, "requests": len(records),
            "req/s": round(len(records) / elapsed, 1), "200": statuses.get(200, 0), "503": statuses.get(503, 0),
            "other": ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()) if k not in (200, 503)) or 0,
            "p50 s": round(percentile(answered, 0.5), 4), "p99 s": round(percentile(answered, 0.99), 4),
            "rss MB": round(resident_mb(pid), 1) if pid is not None else "",
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--pid", type=int, default=None, help="with --url: the server's process id, for its memory")
    parser.add_argument("--model", default=None, help="the started server's model (default: a micro CoordTok)")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--seconds", type=float, default=15.0, help="per concurrency level")
    parser.add_argument("--leak-requests", type=int, default=2000)
    parser.add_argument("--leak-margin-mb", type=float, default=25.0)
    parser.add_argument("--retry-wait-s", type=float, default=0.1, help="a client's pause after a 503")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="coordtok-load-"))
    server = None
    if args.url:
        url, pid, model = args.url, args.pid, "as served"
    else:
        model = args.model or str(micro_model(folder / "micro.safetensors"))
        server, url, log = start_server(model, folder)
        pid = server.pid
    try:
        clip = short_clip()
        tokens = httpx.post(f"{url}/v1/encode", content=clip, headers={"content-type": "video/mp4"}, timeout=300)
        tokens.raise_for_status()
        served = httpx.get(f"{url}/v1/models").json()["models"][0]
        work = Workload(url, clip, tokens.content, args.retry_wait_s)

        leak = measure_leak(work, pid, args.leak_requests, args.leak_margin_mb)
        rows = [row for clients in args.concurrency.split(",") for row in measure_level(work, int(clients), args.seconds, pid)]
        still_ready = httpx.get(f"{url}/readyz").status_code == 200
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    shutil.rmtree(folder, ignore_errors=True)  # kept (with the server's log) when the run failed

    print(f"# server {url} ({served['id']}, {served['config']['frames']} frames of "
          f"{served['config']['height']}x{served['config']['width']}) on {served['devices']}")
    print(f"# leak: {leak['requests']} requests by 8 clients in {leak['seconds']} s, statuses {leak['statuses']}; "
          f"resident MB every 200 requests: {leak['rss_mb_every_200']}")
    if "growth_mb" in leak:
        print(f"# resident memory after 200: {leak['rss_mb_after_200']} MB, after {args.leak_requests}: "
              f"{leak['rss_mb_after_last']} MB (growth {leak['growth_mb']} MB, margin {args.leak_margin_mb} MB: "
              f"{'ok' if leak['within_margin'] else 'EXCEEDED'})")
    print_table(rows, ["clients", "route", "requests", "req/s", "200", "503", "other", "p50 s", "p99 s", "rss MB"])
    print(f"# ready after the run: {still_ready}; requests without an answer: {dict(work.transport_errors) or 0}")
    write_json(args.json, "load", rows, {"server": {"model": served["id"], "config": {k: served["config"][k] for k in ("frames", "height", "width")},
                                                    "devices": served["devices"], "settings": "defaults (max_queue 32)"},
                                         "workload": "alternate encode of a 16-frame 32x32 H.264 clip and decode of its tokens to mp4",
                                         "seconds_per_level": args.seconds, "retry_wait_s": args.retry_wait_s,
                                         "leak": leak, "ready_after": still_ready})


if __name__ == "__main__":
    main()
