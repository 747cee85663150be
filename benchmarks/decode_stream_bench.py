"""Time to first byte and peak memory of a /v1/decode answer, streamed (the server) against buffered
(the whole video decoded, restored and encoded before the first byte, as the server did before).

    python benchmarks/decode_stream_bench.py --clips 8 --source 512 --json benchmarks/results/decode_stream_cpu.json

The server runs in this process (an ASGI test client that streams), with `--model` (default: the
bundled coordtok-tiny weights). Tokens of `--clips` random clips are decoded and restored to
`--source`x`--source` (restore_size). Streamed: the first chunk's arrival, the last's, and the
request's peak traced Python memory (tracemalloc: numpy arrays and bytes, server and client).
Buffered: the same clips decoded by the model in one call, restored and written with
`formats.video_write.video_bytes`: nothing could leave before the end, and its peak traced memory.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

import torch
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import print_table, write_json  # noqa: E402
from coordtok.formats.tokens import Tokens, plane_shapes, serialise  # noqa: E402
from coordtok.formats.geometry import plan_geometry, restore_source_size  # noqa: E402
from coordtok.formats.video_write import video_bytes  # noqa: E402
from coordtok.model import Triplane, load_model  # noqa: E402
from coordtok.model.triplane import to_uint8  # noqa: E402
from coordtok.service.app import create_app  # noqa: E402
from coordtok.service.settings import Settings  # noqa: E402

SAFETENSORS = {"content-type": "application/vnd.coordtok.tokens+safetensors"}


def stretched_tokens(config, clips: int, source: int) -> tuple[Triplane, bytes]:
    """Random tokens whose metadata says they were stretched from a source x source video."""
    generator = torch.Generator().manual_seed(0)
    triplane = Triplane(*(0.5 * torch.randn(clips, *shape, generator=generator) for shape in plane_shapes(config).values()))
    h, w = config.height, config.width
    meta = {"n_frames": json.dumps([config.frames] * clips), "fps": "24", "source_size": json.dumps([source, source]),
            "geometry": json.dumps({"policy": "stretch", "scaled": [h, w], "crop": [0, 0, h, w], "pad": [0, 0, h, w]})}
    return triplane, serialise(Tokens(triplane, meta), "safetensors")


def streamed(client: TestClient, body: bytes, fmt: str) -> dict:
    tracemalloc.start()
    try:
        began, first, size = time.perf_counter(), None, 0
        with client.stream("POST", f"/v1/decode?format={fmt}&restore_size=true", content=body, headers=SAFETENSORS) as answer:
            answer.raise_for_status()
            for chunk in answer.iter_bytes():
                first = first if first is not None else time.perf_counter() - began
                size += len(chunk)
        total = time.perf_counter() - began
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return {"first_byte_s": round(first, 3), "total_s": round(total, 3), "peak_mb": round(peak / 1e6, 1), "mb": round(size / 1e6, 1)}


def buffered(model, triplane: Triplane, config, source: int, fmt: str) -> dict:
    tracemalloc.start()
    try:
        began = time.perf_counter()
        with torch.inference_mode():
            video = to_uint8(model.decode_video(triplane)).flatten(0, 1).numpy()
        geometry = plan_geometry((source, source), (config.height, config.width), "stretch")
        size = len(video_bytes(restore_source_size(video, geometry), 24, fmt))
        total = time.perf_counter() - began
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return {"first_byte_s": round(total, 3), "total_s": round(total, 3), "peak_mb": round(peak / 1e6, 1), "mb": round(size / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="a .safetensors file (default: the bundled model)")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--source", type=int, default=512, help="restored frame side")
    parser.add_argument("--formats", nargs="+", default=["npy", "mp4"])
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    model = load_model(Path(args.model) if args.model else None, "cpu").eval()
    config = model.config
    triplane, body = stretched_tokens(config, args.clips, args.source)
    rows = []
    with TestClient(create_app(Settings(model=args.model, devices=["cpu"], generator="none"))) as client:
        for fmt in args.formats:
            rows.append({"format": fmt, "answer": "streamed", **streamed(client, body, fmt)})
            rows.append({"format": fmt, "answer": "buffered", **buffered(model, triplane, config, args.source, fmt)})
    print(f"{args.clips} clips of {config.frames} frames restored to {args.source}x{args.source}")
    print_table(rows, ["format", "answer", "first_byte_s", "total_s", "peak_mb", "mb"])
    write_json(args.json, "decode_stream", rows, {"clips": args.clips, "frames": config.frames, "source": args.source})


if __name__ == "__main__":
    main()
