"""Smoke test of a real server on one device: start `coordtok serve` with the bundled models, then
encode a clip, decode a frame range of its tokens, run a generation job to its end, and scrape
/metrics. One line per check (`PASS name` / `FAIL name: why`); exit status 1 if any failed.

    python benchmarks/service_smoke.py --device cuda:0 --json benchmarks/results/smoke_h200.json
    python benchmarks/service_smoke.py --device cpu
"""
from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import machine, write_json  # noqa: E402
from coordtok.formats.video_write import write_video  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clip(frames: int = 40, h: int = 72, w: int = 96) -> bytes:
    """A moving pattern, MP4."""
    t = np.arange(frames)[:, None, None, None]
    y, x = np.arange(h)[None, :, None, None], np.arange(w)[None, None, :, None]
    pixels = 127 + 100 * np.sin(0.2 * x + 0.1 * y - 0.3 * t + np.array([0.0, 2.0, 4.0]))
    buffer = io.BytesIO()
    write_video(pixels.astype(np.uint8), buffer, fps=10)
    return buffer.getvalue()


def checks(url: str, device: str, timeout_s: float):
    """Yield (name, passed, detail) for each check against a ready server."""
    with httpx.Client(base_url=url, timeout=timeout_s) as c:
        began = time.perf_counter()
        encoded = c.post("/v1/encode?format=safetensors", content=clip(), headers={"content-type": "video/mp4"})
        yield "encode", encoded.status_code == 200, f"{encoded.status_code} in {time.perf_counter() - began:.2f} s"

        began = time.perf_counter()
        decoded = c.post("/v1/decode?start=3&end=11&format=npy", content=encoded.content,
                         headers={"content-type": encoded.headers.get("content-type", "")})
        shape = np.load(io.BytesIO(decoded.content)).shape if decoded.status_code == 200 else None
        yield "range decode", decoded.status_code == 200 and shape is not None and shape[0] == 8, \
            f"{decoded.status_code}, frames {shape} in {time.perf_counter() - began:.2f} s"

        began = time.perf_counter()
        job = c.post("/v1/generate", json={"num_videos": 1, "steps": 2, "seed": 1, "format": "tokens"})
        status = "not created"
        if job.status_code == 202:
            job_id = job.json()["id"]
            while time.perf_counter() - began < timeout_s:
                status = c.get(f"/v1/jobs/{job_id}").json()["status"]
                if status in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.2)
            result = c.get(f"/v1/jobs/{job_id}/results/0") if status == "succeeded" else None
            status += f", result {result.status_code if result is not None else '-'}"
        yield "generation job", status == "succeeded, result 200", f"{status} in {time.perf_counter() - began:.2f} s"

        scrape = c.get("/metrics")
        wanted = ['coordtok_requests_total{route="/v1/encode",status="200"}', "coordtok_frames_processed_total"]
        if device.startswith("cuda"):
            wanted += [f'coordtok_warmup_peak_memory_bytes{{device="{device}"}}',
                       f'coordtok_gpu_memory_allocated_bytes{{device="{device}"}}']
        missing = [name for name in wanted if name not in scrape.text]
        peak = [line for line in scrape.text.splitlines() if line.startswith("coordtok_warmup_peak_memory_bytes")]
        yield "metrics", scrape.status_code == 200 and not missing, f"missing {missing}" if missing else "; ".join(peak) or "ok"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--timeout", type=float, default=90, help="seconds to start, and for each check")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "COORDTOK_DEVICES": json.dumps([args.device]),
               "COORDTOK_JOBS_DIR": str(Path(folder) / "jobs"), "COORDTOK_LOG_FORMAT": "text"}
        log = Path(folder) / "server.log"
        with open(log, "w") as output:
            server = subprocess.Popen([sys.executable, "-m", "coordtok.service.cli", "serve", "--host", "127.0.0.1",
                                       "--port", str(port)], env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
        url, results = f"http://127.0.0.1:{port}", []
        try:
            began, ready = time.perf_counter(), False
            while not ready and server.poll() is None and time.perf_counter() - began < args.timeout:
                try:
                    ready = httpx.get(f"{url}/readyz").status_code == 200
                except httpx.TransportError:
                    time.sleep(0.2)
            results.append(("start", ready, f"ready in {time.perf_counter() - began:.1f} s" if ready
                            else f"not ready: {log.read_text()[-2000:]}"))
            if ready:
                results += list(checks(url, args.device, args.timeout))
        finally:
            server.terminate()
            server.wait(timeout=60)
    for name, passed, detail in results:
        print(f"{'PASS' if passed else 'FAIL'} {name}: {detail}")
    rows = [{"check": name, "passed": passed, "detail": detail} for name, passed, detail in results]
    write_json(args.json, "service_smoke", rows, extra={"device": args.device, "host": machine()["device"]})
    return 0 if all(passed for _, passed, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
