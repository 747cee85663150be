"""The `coordtok` command."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch


def moving_shapes_clip(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A synthetic clip [frames, height, width, 3] in [-1, 1]: a smooth colour gradient with a
    bright disc moving across it, so that reconstructions are easy to judge by eye and by PSNR."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(frames).float()[:, None, None]
    x = torch.linspace(0, 1, height)[None, :, None]
    y = torch.linspace(0, 1, width)[None, None, :]
    phase = torch.rand(3, generator=g) * 2 * math.pi
    base = torch.stack([torch.sin(2 * math.pi * (x + y) / 2 + t / frames * 2 + p) for p in phase], dim=-1)
    cx = 0.5 + 0.3 * torch.sin(2 * math.pi * t / frames)
    cy = 0.2 + 0.6 * t / max(frames - 1, 1)
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < 0.02).float()[..., None]
    return (0.6 * base * (1 - disc) + disc).clamp(-1, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1] (compared in [0, 1])."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).square().mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def cmd_roundtrip(args: argparse.Namespace) -> int:
    from model import load_model

    model = load_model(args.model, device=args.device)
    c = model.config
    video = moving_shapes_clip(c.frames, c.height, c.width, seed=args.seed)[None].to(next(model.parameters()).device)
    with torch.inference_mode():
        start = time.perf_counter()
        triplane = model.encode(video)
        encoded = time.perf_counter()
        recon = model.decode_video(triplane)
        decoded = time.perf_counter()
    report = {
        "model": str(args.model or "default"),
        "device": str(video.device),
        "clip": [c.frames, c.height, c.width],
        "tokens": c.tokens,
        "floats_per_clip": c.tokens * c.latent_channels,
        "encode_s": round(encoded - start, 3),
        "decode_s": round(decoded - encoded, 3),
        "psnr_db": round(psnr(recon, video), 2),
    }
    print(json.dumps(report, indent=2))
    return 0


def cmd_import_official(args: argparse.Namespace) -> int:
    from model import load_official, save_model

    model = load_official(args.checkpoint, args.config, device="cpu")
    save_model(model, args.output, metadata={"source": Path(args.checkpoint).name})
    print(f"wrote {args.output} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coordtok", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    roundtrip = commands.add_parser("roundtrip", help="encode and decode a generated clip, print PSNR and timings")
    roundtrip.add_argument("--model", default=None, help="a .safetensors path or a preset name (default: the bundled model)")
    roundtrip.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    roundtrip.add_argument("--seed", type=int, default=0)
    roundtrip.set_defaults(run=cmd_roundtrip)

    importer = commands.add_parser("import-official", help="convert a checkpoint of the public implementation")
    importer.add_argument("checkpoint", help="the public trainer's .pth checkpoint")
    importer.add_argument("--config", required=True, help="JSON of the reference constructor's keyword arguments")
    importer.add_argument("-o", "--output", required=True, help="output .safetensors path")
    importer.set_defaults(run=cmd_import_official)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"coordtok: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
