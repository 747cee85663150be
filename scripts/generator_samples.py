"""Sample videos with the bundled generator and tokenizer and save a grid of their frames as a PNG
(the pictures in the generator's model card).

    python scripts/generator_samples.py -n 4 --steps 50 -o docs/generator_samples.png

Row k is video k of the request (seed); columns are frames evenly spaced through the clip.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import av
import numpy as np
import torch

from coordtok.model import LatentStats, generate_triplanes, load_generator, load_model
from coordtok.model.checkpoint import DEFAULT_WEIGHTS, file_sha256
from coordtok.model.triplane import to_uint8


def write_png(image: np.ndarray, path: Path) -> None:
    """uint8 [H, W, 3] -> a PNG file, through FFmpeg's PNG encoder."""
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    packets = codec.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24"))
    packets += codec.encode(None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(bytes(packet) for packet in packets))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--num", type=int, default=4, help="videos (rows)")
    parser.add_argument("--columns", type=int, default=6, help="frames per video")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gap", type=int, default=2, help="pixels between frames")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)

    tokenizer = load_model(device="cpu")
    generator, metadata = load_generator(device="cpu", tokenizer_sha256=file_sha256(DEFAULT_WEIGHTS))
    stats = LatentStats.from_json(metadata["latent_stats"])
    triplanes = generate_triplanes(generator, stats, args.num, args.steps, args.sampler, args.seed)
    with torch.inference_mode():
        videos = to_uint8(tokenizer.decode_video(triplanes)).numpy()  # [N, T, H, W, 3]
    n, t, h, w, _ = videos.shape
    frames = np.linspace(0, t - 1, args.columns).round().astype(int)
    g = args.gap
    grid = np.full((n * (h + g) - g, len(frames) * (w + g) - g, 3), 255, dtype=np.uint8)
    for row in range(n):
        for col, frame in enumerate(frames):
            grid[row * (h + g) : row * (h + g) + h, col * (w + g) : col * (w + g) + w] = videos[row, frame]
    write_png(grid, args.output)
    print(f"wrote {args.output}: {n} videos x frames {frames.tolist()} (seed {args.seed}, {args.steps} {args.sampler} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
