"""Train a CoordTok tokenizer.

    python -m coordtok.trainer.tokenizer --videos DIR --run-dir runs/tiny --steps 5000
    torchrun --nproc_per_node=8 -m coordtok.trainer.tokenizer --config stage1.json
    python -m coordtok.trainer.tokenizer --config stage1.json --resume

Stage 1 reconstructs `points` random patches per clip (MSE); stage 2 reconstructs whole runs of
frames (MSE + LPIPS when weights are given). The run folder holds the resolved config, the git
commit, metrics.jsonl, checkpoints/ and, at the end, export.safetensors (the serving format).
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from coordtok.model import PRESETS, CoordTok, load_model, preset
from coordtok.model.triplane import patches_to_video
from coordtok.trainer import distributed, loop
from coordtok.trainer.codec_init import codec_init
from coordtok.trainer.config import TrainConfig
from coordtok.model.clips import policy_for
from coordtok.trainer.data import Augment, VideoClips, list_videos
from coordtok.trainer.ema import EMA
from coordtok.trainer.export import export_model, starting_stats
from coordtok.trainer.losses import patch_mse
from coordtok.trainer.loop import EpochSampler, TrainLoop, autocast_dtype, git_commit
from coordtok.trainer.lpips import load_lpips, lpips_video
from coordtok.trainer.views import frame_run, random_patches


def build_model(config: TrainConfig) -> CoordTok:
    if config.model in PRESETS:
        torch.manual_seed(config.seed)
        return CoordTok(replace(preset(config.model), **config.model_overrides))
    if config.model_overrides:
        raise ValueError("model_overrides apply to presets only")
    return load_model(config.model, device="cpu").train()


class Trainer(TrainLoop):
    def __init__(self, config: TrainConfig, dist: distributed.Distributed) -> None:
        self.config, self.dist = config, dist
        self.run_dir = Path(config.run_dir)
        self.model = build_model(config)
        self.model_config = c = self.model.config
        self.stage2_frames = config.stage2_frames or c.decode_slice_frames
        excluded = set(config.exclude)
        files = [p for p in list_videos(config.videos) if p.name not in excluded]
        if not files:
            raise ValueError(f"no videos under {config.videos}")
        self.dataset = VideoClips(
            files, frames=c.frames, height=c.height, width=c.width, fps=config.fps or None,
            cache=config.cache, clips_per_video=config.clips_per_video, seed=config.seed,
            policy=policy_for(c.reference_compat),
            augment=Augment(**config.augment_options) if config.augment else None,
        )
        if config.init == "codec":
            codec_init(self.model, *self.init_clips())

        if config.freeze_encoder:
            self.model.encoder.requires_grad_(False)
        self.model.to(dist.device)
        self.net = DistributedDataParallel(self.model) if dist.enabled else self.model
        trained = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
        self.amp_dtype = autocast_dtype(config, dist.device)
        self.scaler = torch.amp.GradScaler(enabled=self.amp_dtype == torch.float16)
        self.ema = EMA(self.model, config.ema_decay) if config.ema_decay > 0 else None
        self.lpips = load_lpips(config.lpips_weights or None, device=dist.device) if config.stage == 2 else None
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + dist.rank)
        self.sampler = EpochSampler(len(self.dataset), config.seed, dist.rank, dist.world_size)
        if len(self.dataset) // dist.world_size < config.batch_size:
            raise ValueError("fewer clips than one batch per process: lower --batch-size or raise --clips-per-video")
        self.start_position()

    # -- data --------------------------------------------------------------------------------
    def init_clips(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`init_clips` training clips spread over the dataset (the same on every rank):
        video [N, T, H, W, 3] and n_frames [N]."""
        count = min(self.config.init_clips, len(self.dataset))
        items = [self.dataset[i * len(self.dataset) // count] for i in range(count)]
        return torch.stack([video for video, _ in items]), torch.tensor([int(n) for _, n in items])

    def batches(self):
        """Micro-batches forever, from the current data position. The workers persist across
        epochs, so a dataset's cache of decoded videos is filled once."""
        loader = DataLoader(
            self.dataset, batch_size=self.config.batch_size, sampler=self.sampler, num_workers=self.config.workers,
            persistent_workers=self.config.workers > 0, drop_last=True, pin_memory=self.dist.device.type == "cuda",
        )
        while True:
            self.dataset.set_epoch(self.epoch)
            self.sampler.set_position(self.epoch, self.batch_in_epoch * self.config.batch_size)
            for video, n_frames in loader:
                self.batch_in_epoch += 1
                yield video.to(self.dist.device, non_blocking=True), n_frames.to(self.dist.device)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    # -- one step ----------------------------------------------------------------------------
    def loss(self, video: torch.Tensor, n_frames: torch.Tensor) -> torch.Tensor:
        c = self.model_config
        if self.config.stage == 1:
            coords, targets = random_patches(video, n_frames, c, self.config.points, self.generator)
            return patch_mse(self.net(video, n_frames, coords), targets)
        coords, targets, clips = frame_run(video, n_frames, c, self.stage2_frames, self.generator)
        pred = self.net(video, n_frames, coords)
        loss = patch_mse(pred, targets)
        if self.lpips is not None:
            pred_frames = patches_to_video(pred, c)  # [B, stage2_frames, H, W, 3]
            loss = loss + self.config.lpips_weight * lpips_video(self.lpips, pred_frames, clips).sum()
        return loss

    def run_record(self) -> dict:
        return {}

    def export(self) -> None:
        """The serving file: the (EMA) weights with their latent statistics (with a frozen
        encoder, the starting model's)."""
        export_model(self.averaged_weights(), self.dataset, self.run_dir / "export.safetensors",
                     {"git_commit": git_commit(), "steps": str(self.step), "stage": str(self.config.stage)},
                     stats=starting_stats(self.config.model, self.config.freeze_encoder))


def main(argv: list[str] | None = None) -> int:
    return loop.main(Trainer, TrainConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
