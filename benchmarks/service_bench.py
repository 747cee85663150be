"""Throughput and latency of a running CoordTok server, and the share of request time spent
outside the model.

    coordtok serve &                                   # or any running server
    python benchmarks/service_bench.py --video clip.mp4 --url http://localhost:8000 --json benchmarks/results/service_cpu.json

For encode and decode at each concurrency (default 1, 4, 16), `--requests` requests are sent by
that many concurrent clients: the table gives requests/s, p50 and p99 latency, and the share of
the server's request time outside the model: 1 - (model time per batch, summed) / (request time,
summed), both read from the server's /metrics before and after the run.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import print_table, write_json  # noqa: E402


def scrape_sums(text: str) -> dict[str, float]:
    """Sums of the request-duration and batch-duration histograms, per route / kind."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        for family in ("coordtok_request_duration_seconds_sum", "coordtok_batch_duration_seconds_sum"):
            if line.startswith(family + "{"):
                labels, value = line[len(family):].rsplit(" ", 1)
                sums[family + labels] = sums.get(family + labels, 0.0) + float(value)
    return sums


def share_outside_model(before: dict, after: dict, route: str, kind: str) -> float:
    request = sum(v - before.get(k, 0) for k, v in after.items() if k.startswith("coordtok_request_duration") and f'route="{route}"' in k)
    model = sum(v - before.get(k, 0) for k, v in after.items() if k.startswith("coordtok_batch_duration") and f'kind="{kind}"' in k)
    return 1 - model / request if request > 0 else float("nan")


async def run(url: str, route: str, body: bytes, content_type: str, concurrency: int, requests: int) -> list[float]:
    latencies: list[float] = []
    queue = list(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            queue.pop()
            started = time.perf_counter()
            response = await http.post(route, content=body, headers={"content-type": content_type})
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument("--video", required=True, help="the clip to encode (its tokens are decoded)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level and route")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    video = Path(args.video).read_bytes()
    tokens = httpx.post(f"{args.url}/v1/encode", content=video, headers={"content-type": "video/mp4"}, timeout=600)
    tokens.raise_for_status()
    device = httpx.get(f"{args.url}/v1/models").json()["models"][0]["devices"]
    cases = [("/v1/encode", "encode", video, "video/mp4"),
             ("/v1/decode", "decode", tokens.content, "application/vnd.coordtok.tokens+safetensors")]
    rows = []
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        for route, kind, body, content_type in cases:
            before = scrape_sums(httpx.get(f"{args.url}/metrics").text)
            started = time.perf_counter()
            latencies = sorted(asyncio.run(run(args.url, route, body, content_type, concurrency, args.requests)))
            elapsed = time.perf_counter() - started
            after = scrape_sums(httpx.get(f"{args.url}/metrics").text)
            rows.append({
                "route": route, "concurrency": concurrency, "requests": len(latencies),
                "req/s": round(len(latencies) / elapsed, 3),
                "p50 s": round(statistics.median(latencies), 3),
                "p99 s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
                "outside model": f"{share_outside_model(before, after, route, kind):.1%}",
            })
    print(f"# server {args.url} on {device}")
    print_table(rows, ["route", "concurrency", "requests", "req/s", "p50 s", "p99 s", "outside model"])
    write_json(args.json, "service_bench", rows, {"server_devices": device, "video": Path(args.video).name})


if __name__ == "__main__":
    main()
