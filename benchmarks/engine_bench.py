"""Peak device memory and time of the engine's warm-up against `batch_max_frames`, and pinned vs
pageable uploads of clips.

    python benchmarks/engine_bench.py                     # coordtok-tiny on CPU (no memory figures)
    python benchmarks/engine_bench.py --preset coordtok-l --batch-frames 128 256 512 1024 \\
        --json benchmarks/results/engine_h200.json        # on a GPU

For each `batch_max_frames` value a fresh replica (`service.engine.DeviceWorker`, the serving
dtype: bf16 autocast on GPUs that have it) runs its warm-up: the largest encode batch that setting
allows (whole clips, one at least) and the largest decode pass (as many clips as fit in one
decoder slice). `peak MiB` is `torch.cuda.max_memory_allocated` over it, weights included: the
memory a server with that setting needs. A setting that runs out of memory gives a row saying so.

On CUDA, `upload` rows time moving `--upload-clips` uint8 clips to the device: `pinned` through
pinned memory with a non-blocking copy (what the engine does), `pageable` with a plain `.to()`;
GB/s counts the clip bytes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, print_table, time_it, write_json  # noqa: E402
from coordtok.model import load_model  # noqa: E402
from coordtok.service.engine import DeviceWorker, upload  # noqa: E402


def warm_up_rows(model, device: torch.device, batch_frames: list[int]) -> list[dict]:
    rows = []
    for frames in batch_frames:
        row = {"batch_max_frames": frames}
        try:
            report = DeviceWorker(model, device, frames, 0.0).warm_up()
            row.update({"dtype": report.dtype, "encode clips": report.encode_clips,
                        "decode clips": report.decode_clips, "seconds": round(report.seconds, 3),
                        "peak MiB": None if report.peak_memory_bytes is None else round(report.peak_memory_bytes / 2**20, 1)})
        except torch.OutOfMemoryError as error:
            row["error"] = f"out of memory: {str(error).splitlines()[0]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def upload_rows(config, device: torch.device, clips: int, repeats: int) -> list[dict]:
    parts = [torch.randint(0, 256, (1, config.frames, config.height, config.width, 3), dtype=torch.uint8)
             for _ in range(clips)]
    nbytes = sum(p.numel() for p in parts)
    ways = {"pinned": lambda: upload(parts, device), "pageable": lambda: torch.cat(parts).to(device)}
    rows = []
    for way, fn in ways.items():
        seconds = time_it(fn, device, repeats=repeats)
        rows.append({"upload": way, "clips": clips, "ms": round(1e3 * seconds, 2), "GB/s": round(nbytes / seconds / 1e9, 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="default: coordtok-l on GPU, coordtok-tiny on CPU")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-frames", type=int, nargs="+", default=None,
                        help="batch_max_frames values (default: 128 256 512 1024 on GPU, 128 256 on CPU)")
    parser.add_argument("--upload-clips", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    name = args.preset or ("coordtok-l" if on_gpu else "coordtok-tiny")
    batch_frames = args.batch_frames or ([128, 256, 512, 1024] if on_gpu else [128, 256])
    model = load_model(name, device=device)

    rows = warm_up_rows(model, device, batch_frames)
    print(f"# {machine()['device']} | {name}")
    print_table(rows, ["batch_max_frames", "dtype", "encode clips", "decode clips", "seconds", "peak MiB", "error"])
    uploads = upload_rows(model.config, device, args.upload_clips, args.repeats) if on_gpu else []
    if uploads:
        print_table(uploads, ["upload", "clips", "ms", "GB/s"])
    write_json(args.json, "engine_bench", rows + uploads, extra={"model": name})


if __name__ == "__main__":
    main()
