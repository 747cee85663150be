"""The generator trainer's configuration, resolved once from a JSON file and CLI flags.

Precedence: defaults < `--config FILE.json` < explicit flags. The resolved config is written to the
run folder (`config.json`) so a run can be repeated and resumed. Defaults follow SiT's recipe
(AdamW at a constant 1e-4 without weight decay, EMA 0.9999), with a short warm-up and clipping.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from coordtok.model.config import SIT_PRESETS
from coordtok.trainer.config import parse_cli


@dataclass
class GeneratorConfig:
    # The frozen tokenizer (a .safetensors file, "" for the bundled default; its latent stats
    # normalise the triplanes) and the SiT preset to train over its triplane, with SiTConfig fields
    # to override.
    tokenizer: str = ""
    model: str = "sit-tiny"
    model_overrides: dict = field(default_factory=dict)

    # Data: a folder of videos (encoded once by the tokenizer and cached in the run folder), or a
    # folder of token files (safetensors, as the server's /v1/encode writes them), or of the shards
    # `coordtok encode-dataset` writes.
    videos: str = ""
    tokens: str = ""
    exclude: list[str] = field(default_factory=list)  # file names held out of training
    conditional: bool = False  # one class per folder of files (UCF-101's layout)
    run_dir: str = "runs/generator"

    batch_size: int = 32  # clips per process and micro-step
    accum_steps: int = 1
    steps: int = 100000  # optimiser steps
    lr: float = 1e-4
    min_lr: float = 1e-4  # cosine decay to min_lr after the warm-up (equal: constant)
    warmup_steps: int = 500
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999  # 0 disables the EMA; the export holds the EMA weights
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16

    fps: float = 0.0  # resample videos to this frame rate (0: keep the source rate)
    clips_per_video: int = 1  # random clips encoded per video
    encode_batch: int = 8  # clips per tokenizer call
    workers: int = 2  # video decoding processes while encoding
    seed: int = 0
    threads: int = 0  # torch CPU threads (0: torch's default)

    log_every: int = 10
    ckpt_every: int = 1000
    keep_last: int = 3
    tensorboard: bool = False

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> tuple[GeneratorConfig, bool]:
        """Parse flags (and --config); returns the config and whether to resume."""
        return parse_cli(cls, argv, "python -m coordtok.trainer.generator", "Train a SiT generator on CoordTok triplanes.")

    def validate(self) -> None:
        if bool(self.videos) == bool(self.tokens):
            raise ValueError("give exactly one of --videos DIR and --tokens DIR")
        if self.model not in SIT_PRESETS:
            raise ValueError(f"model must be one of {sorted(SIT_PRESETS)}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError("precision must be auto, fp32, bf16 or fp16")
        if min(self.batch_size, self.accum_steps, self.steps, self.clips_per_video, self.encode_batch) < 1:
            raise ValueError("batch_size, accum_steps, steps, clips_per_video and encode_batch must be positive")

