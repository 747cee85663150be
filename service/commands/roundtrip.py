"""`coordtok roundtrip`: score the model on a real clip against the trilinear baseline, as its model
card does."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from coordtok.service.commands.common import add_command, add_model_options, model_setting, positive_int

# `coordtok roundtrip`'s default clip: OpenCV's samples/data/tree.avi (Cinepak, 320x240, 15 fps,
# 68 frames though its header says 444; Apache-2.0), byte for byte as Debian's opencv-doc ships
# it. The bundled model's card holds it out of training.
SAMPLE_CLIP = Path(__file__).parent.parent / "static" / "sample.avi"


def add_to(commands) -> None:
    roundtrip = add_command(commands, "roundtrip", "encode and decode a real clip; print PSNR and SSIM beside the trilinear baseline's")
    roundtrip.add_argument("video", nargs="?", default=str(SAMPLE_CLIP),
                           help="the video to score (default: the sample clip shipped with the server, OpenCV's tree.avi)")
    add_model_options(roundtrip)
    roundtrip.add_argument("--clips", type=positive_int, default=1, help="score at most this many clips of the video")
    roundtrip.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    roundtrip.add_argument("--json", action="store_true", help="print the report as JSON")
    roundtrip.set_defaults(run=cmd_roundtrip)


def cmd_roundtrip(args: argparse.Namespace) -> int:
    """Score the model on a real clip against the trilinear baseline, as its model card does."""
    from coordtok.model.checkpoint import default_device
    from coordtok.service.model_setting import load_served_model, model_identity, random_weights_warning
    from coordtok.trainer.evaluate import evaluate

    spec = model_setting(args)
    video = Path(args.video)
    if not video.is_file():
        raise FileNotFoundError(f"no video at {video}")
    if warning := random_weights_warning(spec):
        print(f"coordtok: warning: {warning}", file=sys.stderr)
    device = args.device or str(default_device())
    model = load_served_model(spec, device)
    started = time.perf_counter()
    result = evaluate(model, [video], max_clips=args.clips)
    seconds = time.perf_counter() - started
    if not result["clips"]:
        raise ValueError(f"{video}: {result['skipped'][0]['error'] if result['skipped'] else 'no frames'}")
    c = model.config
    report = {
        "model": model_identity(spec)[0], "device": device, "video": str(video),
        "clips": len(result["clips"]), "frames_scored": sum(row["n_frames"] for row in result["clips"]),
        "clip": [c.frames, c.height, c.width], "tokens": c.tokens, "floats_per_clip": result["budget_floats"],
        "coordtok": {"psnr_db": round(result["mean"]["coordtok"]["psnr"], 2), "ssim": round(result["mean"]["coordtok"]["ssim"], 3)},
        "trilinear_baseline": {"psnr_db": round(result["mean"]["baseline"]["psnr"], 2),
                               "ssim": round(result["mean"]["baseline"]["ssim"], 3), "grid": result["baseline_grid"]},
        "seconds": round(seconds, 2),
    }
    print(json.dumps(report, indent=2) if args.json else roundtrip_text(report))
    return 0


def roundtrip_text(report: dict) -> str:
    """The roundtrip report for a person: the clip, then CoordTok's scores beside the baseline's."""
    frames, height, width = report["clip"]
    model, base = report["coordtok"], report["trilinear_baseline"]
    grid = "x".join(str(n) for n in base["grid"])
    return "\n".join([
        f"{Path(report['video']).name}: {report['frames_scored']} frames in {report['clips']} clip(s) of {frames} frames "
        f"at {width}x{height}, {report['tokens']:,} tokens ({report['floats_per_clip']:,} floats) per clip",
        f"  {'':<28}{'PSNR':>9}{'SSIM':>8}",
        f"  {report['model']:<28}{model['psnr_db']:>6.2f} dB{model['ssim']:>8.3f}",
        f"  {'trilinear baseline':<28}{base['psnr_db']:>6.2f} dB{base['ssim']:>8.3f}   (the same floats: a {grid} grid per colour)",
        f"  encoded, decoded and scored in {report['seconds']:.1f} s on {report['device']}",
    ])
