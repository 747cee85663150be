"""`coordtok encode-dataset`: every video under a folder -> token shards and a manifest
(trainer/encode_dataset.py; torchrun for many GPUs)."""
from __future__ import annotations

import argparse
import sys

import torch

from coordtok.formats.video import MediaLimits
from coordtok.service.commands.common import add_command, add_model_options, model_setting, positive_float, positive_int


def add_to(commands) -> None:
    dataset = add_command(commands, "encode-dataset", "every video under a folder -> token shards and a manifest (torchrun for many GPUs)")
    dataset.add_argument("folder", metavar="DIR", help="the videos, in sub-folders or not (UCF-101's class folders as they are)")
    dataset.add_argument("-o", "--output", required=True, metavar="OUT",
                         help="the folder for shard-*.safetensors and manifest.jsonl (a rerun continues where a run stopped)")
    add_model_options(dataset)
    dataset.add_argument("--shard-size", type=positive_int, default=64, help="videos per shard")
    dataset.add_argument("--batch", type=positive_int, default=16, help="clips per forward pass")
    dataset.add_argument("--workers", type=int, default=2, help="processes decoding videos ahead of the model (0: none)")
    dataset.add_argument("--fps", type=float, default=None, help="resample to this frame rate (default: each video's)")
    dataset.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                         help="auto: bf16 autocast on GPUs, fp32 on the CPU")
    dataset.add_argument("--max-shards", type=positive_int, default=None,
                         help="stop after encoding this many shards (per process); run again to continue")
    dataset.add_argument("--max-frames", type=positive_int, default=MediaLimits.max_frames,
                         help="a video with more frames is listed as unreadable (each is held whole at the model's "
                              "size while it is encoded: 49 KiB per frame at 128x128)")
    dataset.add_argument("--max-duration", type=positive_float, default=MediaLimits.max_duration_s, metavar="SECONDS",
                         help="a longer video is listed as unreadable")
    dataset.set_defaults(run=cmd_encode_dataset)


def cmd_encode_dataset(args: argparse.Namespace) -> int:
    """Every video under a folder -> token shards and a manifest (trainer/encode_dataset.py)."""
    from coordtok.service.model_setting import load_served_model, model_identity, random_weights_warning
    from coordtok.trainer.encode_dataset import EncodeOptions, Tokenizer, run

    spec = model_setting(args)
    options = EncodeOptions(shard_size=args.shard_size, batch=args.batch, workers=args.workers, fps=args.fps,
                            precision=args.precision, max_shards=args.max_shards,
                            limits=MediaLimits(max_frames=args.max_frames, max_duration_s=args.max_duration))
    if warning := random_weights_warning(spec):
        print(f"coordtok: warning: {warning}", file=sys.stderr)

    def load(device: torch.device) -> Tokenizer:
        return Tokenizer(load_served_model(spec, str(device)), *model_identity(spec))

    summary = run(args.folder, args.output, load, options)
    if summary.rank == 0:
        print(summary.text(args.output))
    return 0
