"""The trainers' configurations (the fields every run has, and the tokenizer trainer's), resolved
once from a JSON file and CLI flags.

Precedence: defaults < `--config FILE.json` < explicit flags. The resolved config is written to the
run folder (`config.json`) so a run can be repeated and resumed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from coordtok.model.config import PRESETS


@dataclass(kw_only=True)
class RunConfig:
    """What every training run sets: the model, the data, the loop (trainer/loop.py) and the run
    folder. Each trainer's config extends it and gives the fields left without a default here."""

    # What to train (a preset name, or a .safetensors file to start from) and config fields to
    # override on it.
    model: str
    model_overrides: dict = field(default_factory=dict)
    videos: str = ""
    exclude: list[str] = field(default_factory=list)  # file names held out of training
    run_dir: str

    batch_size: int  # clips per process and micro-step
    accum_steps: int = 1
    steps: int  # optimiser steps
    lr: float = 1e-4
    min_lr: float  # cosine decay to min_lr after the warm-up (equal to lr: constant)
    warmup_steps: int = 500
    weight_decay: float
    grad_clip: float = 1.0
    ema_decay: float  # 0 disables the EMA of the weights
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16

    fps: float = 0.0  # resample videos to this frame rate (0: keep the source rate)
    clips_per_video: int = 1
    workers: int = 2  # video decoding processes
    seed: int = 0
    threads: int = 0  # torch CPU threads (0: torch's default)

    log_every: int = 10
    ckpt_every: int
    keep_last: int = 3
    tensorboard: bool = False

    def validate(self) -> None:
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError("precision must be auto, fp32, bf16 or fp16")

    def require_positive(self, *names: str) -> None:
        """ValueError naming `names` unless each of those fields is 1 or more."""
        if min(getattr(self, name) for name in names) < 1:
            raise ValueError(f"{', '.join(names[:-1])} and {names[-1]} must be positive")


@dataclass(kw_only=True)
class TrainConfig(RunConfig):
    model: str = "coordtok-tiny"  # or a .safetensors file, e.g. stage 1's export
    # How a preset's weights start: "random", or "codec" (trainer/codec_init.py: the network
    # computes a linear triplane codec fitted to `init_clips` training clips, then trains on).
    init: str = "random"
    init_clips: int = 32
    run_dir: str = "runs/tokenizer"

    # Stage 1: MSE on `points` random patches per clip. Stage 2: every patch of
    # `stage2_frames` whole frames (default: the model's decode slice), MSE + LPIPS.
    stage: int = 1
    points: int = 1024
    stage2_frames: int = 0
    lpips_weights: str = ""  # a LPIPS .safetensors file; without it stage 2 is MSE only
    lpips_weight: float = 1.0
    # Train the decoder only: the encoder keeps the starting model's weights, so every video's
    # triplane (its tokens) and the latent statistics stay those of that model, and a generator
    # trained on its tokens stays valid.
    freeze_encoder: bool = False

    batch_size: int = 4
    steps: int = 10000
    min_lr: float = 1e-5
    weight_decay: float = 0.001  # the paper's AdamW weight decay
    ema_decay: float = 0.0

    # Random views of the training clips (trainer/data.py `Augment`: crops, flips, time reversal,
    # strides, short clips); `augment_options` overrides its fields, e.g. {"min_scale": 0.5}.
    augment: bool = False
    augment_options: dict = field(default_factory=dict)
    cache: bool = False  # keep decoded videos in memory

    ckpt_every: int = 500

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
        """Parse flags (and --config); returns the config and whether to resume."""
        return parse_cli(cls, argv, "python -m coordtok.trainer.tokenizer", "Train a CoordTok tokenizer.")

    def validate(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError("stage must be 1 or 2")
        super().validate()
        if self.init not in ("random", "codec"):
            raise ValueError("init must be random or codec")
        if self.freeze_encoder and self.model in PRESETS:
            raise ValueError("freeze_encoder keeps a trained encoder: start from a .safetensors model")
        if self.init == "codec" and self.model not in PRESETS:
            raise ValueError("init=codec starts a preset from scratch; a .safetensors model already has weights")
        if not self.videos:
            raise ValueError("--videos DIR is required")
        self.require_positive("batch_size", "accum_steps", "steps", "points")


def parse_cli(cls, argv: list[str] | None, prog: str, description: str):
    """A flag per field of the config dataclass `cls` (JSON for list and dict fields), `--config
    FILE.json` and `--resume`. Precedence: defaults < the file < explicit flags. Returns
    (validated config, resume)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="JSON file with any of the fields below")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str}.get(str(f.type))
        if str(f.type) == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif kind is not None:
            parser.add_argument(flag, type=kind, default=None)
        else:  # list / dict fields take JSON
            parser.add_argument(flag, type=json.loads, default=None, help="JSON")
    args = parser.parse_args(argv)
    values = json.loads(Path(args.config).read_text()) if args.config else {}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        parser.error(f"unknown fields in {args.config}: {unknown}")
    values.update({k: v for k, v in vars(args).items() if k not in ("config", "resume") and v is not None})
    config = cls(**values)
    try:
        config.validate()
    except ValueError as error:
        parser.error(str(error))
    return config, args.resume
