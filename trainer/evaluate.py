"""Reconstruction quality of a CoordTok model on a folder of videos, against the trilinear
baseline at the same float budget.

    python -m coordtok.trainer.evaluate --model coordtok.safetensors --videos DIR \\
        [--lpips-weights lpips.safetensors | --lpips-backbone vgg16-397923af.pth --lpips-linear vgg.pth] \\
        [--max-clips N] [--refine-steps N] [--json OUT] [--device cpu]

Every video under DIR (recursive) is decoded at the model's frame size (scaled to cover it,
then centre-cropped; its first `--max-frames` frames when given) and cut into clips by the model's
clip policy (`model.clips`: full clips with an overlapping last clip, or one stretched clip for a
video shorter than a clip; -1 padding for the authors' checkpoints), as the server does. A clip is
scored on the frames the stitched video takes from it. The trilinear baseline
(`trainer.metrics.trilinear_baseline`) compresses the real frames the clip holds to
`tokens * latent_channels` floats (the model's latent size) and is scored on the same frames. Each
clip row also has the per-frame PSNR of its last 4 frames (`last4`), the end where padding used to
leak in. Metrics: PSNR and SSIM (`trainer.metrics`), LPIPS-VGG when weights are given, and
ColorVideoVDP (JOD, display "standard_4k", on uint8 frames at the video's frame rate) when the
`cvvdp` package (import name `pycvvdp`) is installed; it is not a dependency of this project.
Means are over clips.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from coordtok.formats.video import FALLBACK_FPS, MediaError, MediaLimits, read_frames
from coordtok.model import PRESETS, CoordTok, load_model
from coordtok.model.checkpoint import file_sha256
from coordtok.model.clips import POLICIES, ClipLayout, policy_for
from coordtok.model.triplane import from_uint8, to_uint8
from coordtok.trainer.data import list_videos
from coordtok.trainer.lpips import LPIPS, load_lpips, lpips_video
from coordtok.trainer.metrics import baseline_grid, psnr, ssim, trilinear_baseline
from coordtok.trainer.refine import refine

METHODS = ("coordtok", "baseline")
CVVDP_DISPLAY = "standard_4k"


def load_cvvdp(device: torch.device | str):
    """The ColorVideoVDP metric when `pycvvdp` is importable, else None."""
    try:
        import pycvvdp
    except ImportError:
        return None
    return pycvvdp.cvvdp(display_name=CVVDP_DISPLAY, device=torch.device(device), quiet=True)


def score(
    reference: torch.Tensor, reconstruction: torch.Tensor, lpips: LPIPS | None, cvvdp, fps: float
) -> dict[str, float]:
    """Metrics of one clip: reference and reconstruction [1, n, H, W, 3] in [-1, 1]."""
    scores = {"psnr": psnr(reconstruction, reference).item(), "ssim": ssim(reconstruction, reference).item(),
              "last4": [psnr(reconstruction[:, i : i + 1], reference[:, i : i + 1]).item()
                        for i in range(max(0, reference.shape[1] - 4), reference.shape[1])]}
    if lpips is not None:
        device = next(lpips.parameters()).device
        scores["lpips"] = lpips_video(lpips, reconstruction.to(device), reference.to(device)).item()
    if cvvdp is not None:
        jod, _ = cvvdp.predict(to_uint8(reconstruction[0]), to_uint8(reference[0]), dim_order="FHWC", frames_per_second=fps)
        scores["jod"] = float(jod)
    return scores


def reconstruct(model: CoordTok, clips: torch.Tensor, n_frames: torch.Tensor, refine_steps: int = 0) -> torch.Tensor:
    """Encode and decode clips (uint8 [B, frames, H, W, 3] with n_frames [B] valid) ->
    [B, frames, H, W, 3] in [-1, 1] (clamped), on the model's device; with `refine_steps`, the
    encoder's triplane is refined that many steps before decoding (`trainer.refine`)."""
    device = next(model.parameters()).device
    video, n_frames = from_uint8(clips.to(device)), n_frames.to(device)
    triplane = model.encode(video, n_frames)
    if refine_steps:
        triplane = refine(model, triplane, video, n_frames, refine_steps)
    return model.decode_video(triplane).float().clamp(-1, 1)


def evaluate(
    model: CoordTok,
    videos: list[Path],
    lpips: LPIPS | None = None,
    max_clips: int | None = None,
    batch_size: int = 4,
    limits: MediaLimits = MediaLimits(),
    max_frames: int | None = None,
    policy: str | None = None,
    refine_steps: int = 0,
) -> dict:
    """Score `model` and the trilinear baseline on the clips of `videos` (at most `max_clips`;
    the first `max_frames` frames of each video when given), cut by the clip `policy` (default:
    the model's; "pad" on a native model measures the -1 padding of the public implementation).
    With `refine_steps`, each clip's triplane is refined before decoding (`trainer.refine`): the
    scores then measure the decoder with the best latents it can be given, not the tokenizer.

    Returns {"budget_floats", "baseline_grid" (of a full clip), "clip_frames", "size", "refine_steps", "lpips",
    "cvvdp" (what was computed, or why not), "clips": one row per clip, "videos": per-video
    means, "mean": means over all clips, "skipped": videos that could not be read}. A clip row is
    {"video", "clip", "start_frame", "n_frames" (frames scored), "baseline_grid", "coordtok":
    scores, "baseline": scores}, scores being {"psnr", "ssim", "last4" (PSNR of each of the last
    4 frames), "lpips"?, "jod"?}.
    """
    c = model.config
    budget = c.tokens * c.latent_channels
    cvvdp = load_cvvdp(next(model.parameters()).device)
    rows, skipped = [], []
    with torch.inference_mode():
        for path in videos:
            remaining = None if max_clips is None else max_clips - len(rows)
            if remaining is not None and remaining <= 0:
                break
            read = _read_video(path, c, limits, max_frames)
            if isinstance(read, str):
                skipped.append({"video": str(path), "error": read})
                continue
            frames, fps = read
            layout = ClipLayout.plan(len(frames), c.frames, policy or policy_for(c.reference_compat))
            count = layout.clips if remaining is None else min(layout.clips, remaining)
            clips, n_frames = layout.cut(frames), layout.model_n_frames()
            for first in range(0, count, batch_size):
                batch = slice(first, min(first + batch_size, count))
                decoded = reconstruct(model, clips[batch], n_frames[batch], refine_steps)
                for i, k in enumerate(range(batch.start, batch.stop)):
                    rows.append(_clip_row(path, layout, k, frames, decoded[i], budget, lpips, cvvdp, fps))
    return {
        "budget_floats": budget,
        "baseline_grid": list(baseline_grid((c.frames, c.height, c.width), budget)),
        "clip_frames": c.frames,
        "size": [c.height, c.width],
        "refine_steps": refine_steps,
        "lpips": "computed" if lpips is not None else "not computed: no LPIPS weights given",
        "cvvdp": f"computed (display {CVVDP_DISPLAY})" if cvvdp is not None else "not computed: the cvvdp package (pycvvdp) is not installed",
        "clips": rows,
        "videos": _video_means(rows),
        "mean": _means(rows),
        "skipped": skipped,
    }


def _read_video(path: Path, config, limits: MediaLimits, max_frames: int | None) -> tuple[torch.Tensor, float] | str:
    """The video at the model's frame size (uint8 [L, H, W, 3]) and its frame rate, or why it
    cannot be scored. With `max_frames`, `limits` apply to those first frames (`read_frames`)."""
    try:
        frames, info, _ = read_frames(path, limits, size=(config.height, config.width), resize="crop", max_frames=max_frames)
    except MediaError as error:
        return f"{type(error).__name__}: {error}"
    if len(frames) == 0:
        return "no frames decoded"
    return torch.from_numpy(frames), info.fps or FALLBACK_FPS


def _clip_row(path, layout: ClipLayout, k: int, frames, decoded, budget, lpips, cvvdp, fps) -> dict:
    """Scores of clip k of a video: its uint8 `frames` [L, H, W, 3] and the model's `decoded` clip
    [T, H, W, 3] in [-1, 1] (metrics run on its device), on the frames the video takes from it."""
    first, end = layout.keep(k)
    (_, (a, b), index), = layout.pieces(first, end)  # one piece: clip k's own frames
    held = from_uint8(frames[layout.starts[k] : layout.starts[k] + layout.lengths[k]])[None].to(decoded.device)
    baseline, grid = trilinear_baseline(held, budget)  # [1, length, H, W, 3]
    kept = slice(first - layout.starts[k], end - layout.starts[k])
    reference, reconstruction = held[:, kept], decoded[a:b][index][None]
    return {
        "video": str(path), "clip": k, "start_frame": first, "n_frames": end - first, "baseline_grid": list(grid),
        "coordtok": score(reference, reconstruction, lpips, cvvdp, fps),
        "baseline": score(reference, baseline[:, kept], lpips, cvvdp, fps),
    }


def _means(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean of every score over `rows`, per method."""
    if not rows:
        return {}
    return {m: {k: float(np.mean([r[m][k] for r in rows])) for k in rows[0][m] if k != "last4"} for m in METHODS}


def _video_means(rows: list[dict]) -> list[dict]:
    """Per video, in order of appearance: {"video", "clips", "coordtok", "baseline"} means."""
    by_video: dict[str, list[dict]] = {}
    for row in rows:
        by_video.setdefault(row["video"], []).append(row)
    return [{"video": name, "clips": len(mine), **_means(mine)} for name, mine in by_video.items()]


def model_id(spec: str) -> dict[str, str]:
    """A preset name, or a weights file's path and sha256."""
    if spec in PRESETS:
        return {"preset": spec}
    path = Path(spec).resolve()
    return {"path": str(path), "sha256": file_sha256(path)}


def format_table(result: dict) -> str:
    """The per-video means and the overall mean as a text table."""
    metrics = list(result["mean"].get("coordtok", {}))
    header = ["video", "clips"] + [f"{k} {m}" for k in metrics for m in METHODS]
    lines = [
        [v["video"], str(v["clips"])] + [_fmt(v[m][k]) for k in metrics for m in METHODS]
        for v in result["videos"]
    ]
    if result["clips"]:
        mean = result["mean"]
        lines.append(["mean", str(len(result["clips"]))] + [_fmt(mean[m][k]) for k in metrics for m in METHODS])
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]
    rows = [header, ["-" * w for w in widths], *lines]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .safetensors file or a preset name")
    parser.add_argument("--videos", required=True, type=Path, help="folder searched recursively for videos")
    parser.add_argument("--lpips-weights", type=Path, help="LPIPS-VGG weights as one .safetensors file")
    parser.add_argument("--lpips-backbone", type=Path, help="torchvision's vgg16-397923af.pth")
    parser.add_argument("--lpips-linear", type=Path, help="the lpips package's weights/v0.1/vgg.pth")
    parser.add_argument("--max-clips", type=int, default=None)
    parser.add_argument("--max-frames", type=int, default=None, help="score only the first N frames of each video (the media limits then apply to those)")
    parser.add_argument("--clip-policy", choices=POLICIES, default=None, help="default: the model's (model/clips.py)")
    parser.add_argument("--batch", type=int, default=4, help="clips per encode/decode call")
    parser.add_argument("--refine-steps", type=int, default=0,
                        help="refine each clip's triplane this many steps before decoding (trainer/refine.py): "
                             "measures the decoder given its best latents; default 0, the tokenizer as served")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if bool(args.lpips_backbone) != bool(args.lpips_linear):
        parser.error("--lpips-backbone and --lpips-linear go together")
    if args.refine_steps < 0:
        parser.error("--refine-steps must be 0 or more")
    if args.max_frames is not None and args.max_frames < 1:
        parser.error("--max-frames must be 1 or more")
    if args.lpips_weights and args.lpips_backbone:
        parser.error("give --lpips-weights or --lpips-backbone/--lpips-linear, not both")
    weights = args.lpips_weights or ((args.lpips_backbone, args.lpips_linear) if args.lpips_backbone else None)

    model = load_model(args.model, device=args.device)
    lpips = load_lpips(weights, device=args.device) if weights else None
    try:
        videos = list_videos(args.videos)
    except FileNotFoundError as error:
        parser.error(str(error))
    result = {"model": model_id(args.model), "config": json.loads(model.config.to_json()),
              **evaluate(model, videos, lpips=lpips, max_clips=args.max_clips, batch_size=args.batch,
                        max_frames=args.max_frames, policy=args.clip_policy, refine_steps=args.refine_steps)}
    print(format_table(result))
    print(f"LPIPS: {result['lpips']}; ColorVideoVDP: {result['cvvdp']}; baseline grid {result['baseline_grid']} "
          f"for {result['budget_floats']} floats per clip")
    for skip in result["skipped"]:
        print(f"skipped {skip['video']}: {skip['error']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
