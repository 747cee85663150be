"""Train a CoordTok tokenizer.

    python -m trainer.tokenizer --videos DIR --run-dir runs/tiny --steps 5000
    torchrun --nproc_per_node=8 -m trainer.tokenizer --config stage1.json
    python -m trainer.tokenizer --config stage1.json --resume

Stage 1 reconstructs `points` random patches per clip (MSE); stage 2 reconstructs whole runs of
frames (MSE + LPIPS when weights are given). The run folder holds the resolved config, the git
commit, metrics.jsonl, checkpoints/ and, at the end, export.safetensors (the serving format).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from model import PRESETS, CoordTok, load_model, preset
from model.triplane import patches_to_video
from trainer import distributed
from trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.data import VideoClips, list_videos
from trainer.ema import EMA
from trainer.export import export_model
from trainer.losses import patch_mse
from trainer.lpips import load_lpips, lpips_video
from trainer.views import frame_run, random_patches


class EpochSampler(Sampler[int]):
    """Indices shuffled per epoch (seeded by seed + epoch), split across ranks, able to start
    part-way through an epoch so that a resumed run sees the data an uninterrupted one would."""

    def __init__(self, length: int, seed: int, rank: int, world_size: int) -> None:
        self.length, self.seed, self.rank, self.world_size = length, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = order[self.rank : len(order) - len(order) % self.world_size : self.world_size]
        return iter(mine[self.start :].tolist())

    def __len__(self) -> int:
        return self.length // self.world_size - self.start


def build_model(config: TrainConfig) -> CoordTok:
    if config.model in PRESETS:
        torch.manual_seed(config.seed)
        return CoordTok(replace(preset(config.model), **config.model_overrides))
    if config.model_overrides:
        raise ValueError("model_overrides apply to presets only")
    return load_model(config.model, device="cpu").train()


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Trainer:
    def __init__(self, config: TrainConfig, dist: distributed.Distributed) -> None:
        self.config, self.dist = config, dist
        self.run_dir = Path(config.run_dir)
        self.model = build_model(config).to(dist.device)
        self.model_config = self.model.config
        self.stage2_frames = config.stage2_frames or self.model_config.decode_slice_frames
        self.net = DistributedDataParallel(self.model) if dist.enabled else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.amp_dtype = autocast_dtype(config, dist.device)
        self.scaler = torch.amp.GradScaler(enabled=self.amp_dtype == torch.float16)
        self.ema = EMA(self.model, config.ema_decay) if config.ema_decay > 0 else None
        self.lpips = load_lpips(config.lpips_weights or None, device=dist.device) if config.stage == 2 else None
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + dist.rank)

        excluded = set(config.exclude)
        files = [p for p in list_videos(config.videos) if p.name not in excluded]
        if not files:
            raise ValueError(f"no videos under {config.videos}")
        c = self.model_config
        self.dataset = VideoClips(
            files, frames=c.frames, height=c.height, width=c.width, fps=config.fps or None,
            cache=config.cache, clips_per_video=config.clips_per_video, seed=config.seed,
        )
        self.sampler = EpochSampler(len(self.dataset), config.seed, dist.rank, dist.world_size)
        if len(self.dataset) // dist.world_size < config.batch_size:
            raise ValueError("fewer clips than one batch per process: lower --batch-size or raise --clips-per-video")
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0

    # -- state -------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else {},
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "views": self.generator.get_state(),
            },
            "data": {"epoch": self.epoch, "batch": self.batch_in_epoch},
            "model_config": self.model_config.to_json(),
        }

    def restore(self, state: dict) -> None:
        if state["model_config"] != self.model_config.to_json():
            raise ValueError("the checkpoint was made with another model config")
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema:
            self.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        self.generator.set_state(state["rng"]["views"].cpu())
        self.epoch, self.batch_in_epoch = state["data"]["epoch"], state["data"]["batch"]

    # -- data --------------------------------------------------------------------------------
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

    def train_step(self, batches) -> float:
        config = self.config
        lr = learning_rate(config, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.dist.device)
        for micro in range(config.accum_steps):
            video, n_frames = next(batches)
            last = micro == config.accum_steps - 1
            # DDP all-reduces gradients on the last micro-step only.
            with self.net.no_sync() if self.dist.enabled and not last else contextlib.nullcontext():
                with torch.autocast(self.dist.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss = self.loss(video, n_frames) / config.accum_steps
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update(self.model)
        self.step += 1
        return distributed.mean_across(total, self.dist)

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> None:
        config, is_main = self.config, self.dist.is_main
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(
                {"train": config.to_dict(), "model": json.loads(self.model_config.to_json()),
                 "git_commit": git_commit(), "world_size": self.dist.world_size}, indent=2))
        metrics = _metrics_log(self.run_dir / "metrics.jsonl", self.step) if is_main else None
        board = _tensorboard(self.run_dir) if is_main and config.tensorboard else None
        clips_per_step = config.batch_size * config.accum_steps * self.dist.world_size
        bar = tqdm(total=config.steps, initial=self.step, disable=not is_main, dynamic_ncols=True)
        batches = self.batches()
        started, started_step = time.perf_counter(), self.step
        while self.step < config.steps:
            loss = self.train_step(batches)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {self.step}")
            rate = (self.step - started_step) * clips_per_step / (time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", clips_s=f"{rate:.2f}")
            if is_main and (self.step % config.log_every == 0 or self.step == config.steps):
                record = {"step": self.step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                          "clips_per_s": rate, "epoch": self.epoch, "time": time.time()}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if board:
                    board.add_scalar("train/loss", loss, self.step)
            if self.step % config.ckpt_every == 0 or self.step == config.steps:
                if is_main:
                    save_checkpoint(self.run_dir, self.step, self.state(), config.keep_last)
        bar.close()
        if is_main:
            metrics.close()
            weights = self.model
            if self.ema:
                weights = copy.deepcopy(self.model)
                self.ema.copy_to(weights)
            export_model(weights, self.dataset, self.run_dir / "export.safetensors",
                         {"git_commit": git_commit(), "steps": str(self.step), "stage": str(config.stage)})


def _metrics_log(path: Path, step: int):
    """metrics.jsonl opened for appending, without the records past `step` (a run resumed from
    an earlier checkpoint logs those steps again)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
    return path.open("a")


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed; metrics go to metrics.jsonl only", file=sys.stderr)
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def main(argv: list[str] | None = None) -> int:
    config, resume = TrainConfig.from_cli(argv)
    if config.threads:
        torch.set_num_threads(config.threads)
    dist = distributed.setup()
    try:
        trainer = Trainer(config, dist)
        if resume:
            path = latest_checkpoint(config.run_dir)
            if path is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {config.run_dir}/checkpoints")
            trainer.restore(load_checkpoint(path, dist.device))
            if dist.is_main:
                print(f"resumed from {path} at step {trainer.step}", file=sys.stderr)
        trainer.run()
    finally:
        distributed.teardown(dist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
