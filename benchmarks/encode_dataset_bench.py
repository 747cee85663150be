"""clips/s of `coordtok encode-dataset` against the DataLoader workers that decode the videos.

    python benchmarks/encode_dataset_bench.py                      # bundled coordtok-tiny on CPU
    python benchmarks/encode_dataset_bench.py --model coordtok-l   # a preset (random weights), e.g. on GPU
    python benchmarks/encode_dataset_bench.py --json benchmarks/results/encode_dataset_cpu.json

A folder of generated H.264 videos (moving gradients, --videos of --frames frames at --size) is
encoded into a fresh folder by `trainer.encode_dataset.encode_dataset` once per worker count, in one
process on --device (cuda when present), after a warm-up shard. Columns: clips/s and videos/s of the
whole run (listing, decoding, encoding, writing shards); `vs model only` is the run's clips/s over
the model's alone, timed on the same clips already decoded and cut, in the batches the run makes
(`ShardEncoder`, --batch clips counted from each shard's first): how much of the encoder's speed the
run keeps with decoding in the process (0 workers) or beside it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, print_table, sync, write_json  # noqa: E402
from coordtok.formats.video_write import write_video  # noqa: E402
from coordtok.model import PRESETS, load_model  # noqa: E402
from coordtok.model.checkpoint import DEFAULT_WEIGHTS, file_sha256  # noqa: E402
from coordtok.trainer import distributed  # noqa: E402
from coordtok.trainer.data import list_videos  # noqa: E402
from coordtok.trainer.encode_dataset import (  # noqa: E402
    EncodeOptions, ShardEncoder, Tokenizer, VideoFiles, encode_dataset,
)
from coordtok.trainer.loop import autocast_dtype  # noqa: E402


def write_videos(root: Path, count: int, frames: int, size: tuple[int, int]) -> None:
    h, w = size
    t, y, x = np.arange(frames)[:, None, None, None], np.arange(h)[None, :, None, None], np.arange(w)[None, None, :, None]
    for i in range(count):
        clip = 127 + 100 * np.sin(0.05 * x * (1 + i % 3) + 0.04 * y - 0.2 * t + i + np.arange(3))
        (root / f"class{i % 3}").mkdir(parents=True, exist_ok=True)
        write_video(clip.clip(0, 255).astype(np.uint8), root / f"class{i % 3}" / f"video{i:03d}.mp4", fps=25)


def model_only_clips_per_s(root: Path, tokenizer: Tokenizer, options: EncodeOptions) -> float:
    """The encoder alone: the dataset's clips, decoded and cut beforehand, through a ShardEncoder
    per shard (the batches a run makes)."""
    model = tokenizer.model
    device = next(model.parameters()).device
    sources = [path.relative_to(root).as_posix() for path in list_videos(root)]
    videos = list(VideoFiles(root, sources, model, options.fps))
    sync(device)
    started, clips = time.perf_counter(), 0
    for first in range(0, len(videos), options.shard_size):
        encoder = ShardEncoder(model, options.batch, autocast_dtype(options, device))
        for video in videos[first:first + options.shard_size]:
            encoder.add(video.clips, video.layout.model_n_frames())
        encoder.finish()
        clips += encoder.added
    sync(device)
    return clips / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a preset (random weights) or a .safetensors file (default: bundled)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--videos", type=int, default=12, help="videos in the generated folder")
    parser.add_argument("--frames", type=int, default=160, help="frames per video")
    parser.add_argument("--size", type=int, nargs=2, default=[120, 160], metavar=("H", "W"), help="frame size")
    parser.add_argument("--batch", type=int, default=16, help="clips per forward pass")
    parser.add_argument("--shard-size", type=int, default=4, help="videos per shard")
    parser.add_argument("--json", default=None, help="write results to this JSON file")
    args = parser.parse_args()

    device = torch.device(args.device)
    model = load_model(args.model, device=device)
    if args.model in PRESETS:
        tokenizer = Tokenizer(model, f"{args.model}@random", "")
    else:
        path = Path(args.model) if args.model else DEFAULT_WEIGHTS
        sha256 = file_sha256(path)
        tokenizer = Tokenizer(model, f"{path.stem}@{sha256[:12]}", sha256)
    dist = distributed.Distributed(rank=0, world_size=1, device=device)
    load = os.getloadavg()[0]  # other work on the machine when the benchmark started
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "videos"
        write_videos(root, args.videos, args.frames, tuple(args.size))
        options = EncodeOptions(shard_size=args.shard_size, batch=args.batch, workers=0, progress=False)
        encode_dataset(root, Path(folder) / "warm-up", tokenizer, EncodeOptions(**{**vars(options), "max_shards": 1}), dist)
        model_rate = model_only_clips_per_s(root, tokenizer, options)
        for workers in args.workers:
            summary = encode_dataset(root, Path(folder) / f"out{workers}", tokenizer,
                                     EncodeOptions(**{**vars(options), "workers": workers}), dist)
            rate = summary.clips / summary.seconds
            rows.append({"workers": workers, "clips": summary.clips, "seconds": round(summary.seconds, 2),
                         "clips/s": round(rate, 2), "videos/s": round(args.videos / summary.seconds, 2),
                         "vs model only": f"{rate / model_rate:.0%}"})

    c = model.config
    print(f"# {machine()['device']}; {tokenizer.model_id} ({c.frames} frames at {c.height}x{c.width}) on {device}, "
          f"{args.videos} videos of {args.frames} frames at {args.size[0]}x{args.size[1]}, batch {args.batch}; "
          f"model only: {model_rate:.2f} clips/s; load average {load:.1f}")
    print_table(rows, ["workers", "clips", "seconds", "clips/s", "videos/s", "vs model only"])
    write_json(args.json, "encode_dataset_bench", rows, {"load_average_1min": round(load, 2),
        "model": tokenizer.model_id, "device": str(device), "videos": args.videos, "frames": args.frames,
        "size": args.size, "batch": args.batch, "shard_size": args.shard_size, "model_only_clips_per_s": round(model_rate, 2),
    })


if __name__ == "__main__":
    main()
