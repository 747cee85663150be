"""Export trained weights to the serving format, with the latent statistics the generator needs.

    python -m coordtok.trainer.export runs/tiny -o model/weights/default.safetensors [--ema] [--clips 64]

The file is the native safetensors format (`model.save_model`) whose metadata also holds
`latent_stats`: per plane, per channel mean and std of the triplanes of training clips
(JSON: {"xy": {"mean": [C], "std": [C]}, "yt": ..., "xt": ...}).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

from coordtok.model import CoordTok, CoordTokConfig, save_model
from coordtok.model.checkpoint import read_metadata
from coordtok.model.triplane import PLANES


@torch.inference_mode()
def latent_stats(model: CoordTok, dataset: Dataset, clips: int = 64, batch_size: int = 4) -> dict:
    """Per-plane, per-channel mean and std over the triplanes of the first `clips` clips."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = {p: torch.zeros(model.config.latent_channels, dtype=torch.float64) for p in PLANES}
    squares = {p: torch.zeros_like(sums[p]) for p in PLANES}
    counts = dict.fromkeys(PLANES, 0)
    count = min(clips, len(dataset))
    for start in range(0, count, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, count))]
        video = torch.stack([v for v, _ in items]).to(device)
        n_frames = torch.tensor([n for _, n in items], device=device)
        triplane = model.encode(video, n_frames)
        for name, plane in zip(PLANES, triplane.planes()):
            flat = plane.double().reshape(-1, plane.shape[-1]).cpu()  # [cells, C]
            sums[name] += flat.sum(0)
            squares[name] += flat.square().sum(0)
            counts[name] += flat.shape[0]
    model.train(was_training)
    stats = {}
    for name in PLANES:
        mean = sums[name] / counts[name]
        std = (squares[name] / counts[name] - mean.square()).clamp(min=1e-12).sqrt()
        stats[name] = {"mean": mean.tolist(), "std": std.tolist()}
    return stats


def starting_stats(model: str, freeze_encoder: bool) -> str | None:
    """The latent stats (JSON) an export keeps: those of the starting model file `model` when its
    encoder was frozen (the triplanes are that model's), else None (measure them)."""
    return read_metadata(model)["latent_stats"] if freeze_encoder else None


def export_model(model: CoordTok, dataset: Dataset, path: str | Path, metadata: dict[str, str] | None = None,
                 clips: int = 64, dtype: torch.dtype = torch.float32, stats: str | None = None) -> None:
    """Write `model` (cast to `dtype`) with its latent statistics to `path`: `stats` (their JSON,
    kept from the starting model when its encoder was frozen) or measured on `clips` clips."""
    stats = stats or json.dumps(latent_stats(model, dataset, clips))
    export = CoordTok(model.config)
    export.load_state_dict(model.state_dict())
    save_model(export.to(dtype), path, metadata={**(metadata or {}), "latent_stats": stats})


def main(argv: list[str] | None = None) -> int:
    from coordtok.trainer.checkpoint import latest_checkpoint, load_checkpoint
    from coordtok.model.clips import policy_for
    from coordtok.trainer.data import VideoClips, list_videos

    parser = argparse.ArgumentParser(prog="python -m coordtok.trainer.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run folder of trainer.tokenizer")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--ema", action="store_true", help="export the EMA weights")
    parser.add_argument("--clips", type=int, default=64, help="clips for the latent statistics")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="stored weight dtype")
    args = parser.parse_args(argv)

    run = json.loads((Path(args.run_dir) / "config.json").read_text())
    checkpoint = latest_checkpoint(args.run_dir)
    if checkpoint is None:
        print(f"no checkpoint in {args.run_dir}", file=sys.stderr)
        return 2
    state = load_checkpoint(checkpoint)
    model = CoordTok(CoordTokConfig.from_json(state["model_config"]))
    model.load_state_dict(state["ema"] if args.ema else state["model"])
    train, c = run["train"], model.config
    files = [p for p in list_videos(train["videos"]) if p.name not in set(train["exclude"])]
    dataset = VideoClips(files, frames=c.frames, height=c.height, width=c.width, fps=train["fps"] or None,
                         cache=False, clips_per_video=1, seed=train["seed"], policy=policy_for(c.reference_compat))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    export_model(model, dataset, args.output, {"git_commit": run["git_commit"], "steps": str(state["step"]),
                                                "stage": str(train["stage"])}, clips=args.clips, dtype=dtype,
                 stats=starting_stats(train["model"], train.get("freeze_encoder", False)))
    print(f"wrote {args.output} from {checkpoint.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
