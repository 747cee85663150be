"""The generator trainer's configuration, resolved once from a JSON file and CLI flags.

Precedence: defaults < `--config FILE.json` < explicit flags. The resolved config is written to the
run folder (`config.json`) so a run can be repeated and resumed. Defaults follow SiT's recipe
(AdamW at a constant 1e-4 without weight decay, EMA 0.9999), with a short warm-up and clipping.
"""
from __future__ import annotations

from dataclasses import dataclass

from coordtok.model.config import SIT_PRESETS
from coordtok.trainer.config import RunConfig, parse_cli


@dataclass(kw_only=True)
class GeneratorConfig(RunConfig):
    # The frozen tokenizer (a .safetensors file, "" for the bundled default; its latent stats
    # normalise the triplanes) and the SiT preset to train over its triplane, with SiTConfig fields
    # to override.
    tokenizer: str = ""
    model: str = "sit-tiny"

    # Data: a folder of videos (encoded once by the tokenizer and cached in the run folder), or a
    # folder of token files (safetensors, as the server's /v1/encode writes them), or of the shards
    # `coordtok encode-dataset` writes.
    tokens: str = ""
    conditional: bool = False  # one class per folder of files (UCF-101's layout)
    run_dir: str = "runs/generator"

    batch_size: int = 32
    steps: int = 100000
    min_lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999  # the export holds the EMA weights

    encode_batch: int = 8  # clips per tokenizer call (clips_per_video: random clips encoded per video)

    ckpt_every: int = 1000

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> tuple[GeneratorConfig, bool]:
        """Parse flags (and --config); returns the config and whether to resume."""
        return parse_cli(cls, argv, "python -m coordtok.trainer.generator", "Train a SiT generator on CoordTok triplanes.")

    def validate(self) -> None:
        if bool(self.videos) == bool(self.tokens):
            raise ValueError("give exactly one of --videos DIR and --tokens DIR")
        if self.model not in SIT_PRESETS:
            raise ValueError(f"model must be one of {sorted(SIT_PRESETS)}")
        super().validate()
        self.require_positive("batch_size", "accum_steps", "steps", "clips_per_video", "encode_batch")
