"""What the tokenizer and generator trainers share: the optimiser step, the checkpoint state, the
run loop (progress bar, metrics.jsonl, TensorBoard, checkpoints, export) and the command line.

A trainer subclasses `TrainLoop`, builds its model, optimiser and data in `__init__`, and defines
`batches()` (micro-batches forever, from the data position), `loss(*batch)`, `run_record()` (what
the run folder's config.json records) and `export()` (the serving file at the end of the run).

Exact resume: a checkpoint restores everything the next step reads (weights, optimiser, scaler,
EMA, RNG streams, data position), so a resumed run repeats an uninterrupted one bit for bit where
every kernel is deterministic: on the CPU always; on CUDA only when the process calls
`torch.use_deterministic_algorithms(True)` (with `CUBLAS_WORKSPACE_CONFIG=:4096:8`), which also
switches the triplane sampling backward to its fixed-order reduction. Without it, atomics (the
triplane backward, index and attention backwards) add in a varying order, and a resumed run, like
any rerun, drifts from the first by rounding. config.json records which held
(`deterministic_algorithms`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Sampler
from tqdm import tqdm

from coordtok.trainer import distributed
from coordtok.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


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


def learning_rate(config, step: int) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def autocast_dtype(config, device: torch.device) -> torch.dtype | None:
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


class TrainLoop:
    """The shared loop. `__init__` of a subclass sets: config, dist, run_dir, model (its
    `.config` has `to_json`), model_config, net (model, or its DDP wrapper), optimizer, amp_dtype,
    scaler, ema (or None), generator (the CPU stream of the views), sampler; then `start_position()`."""

    def start_position(self) -> None:
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

    # -- one step ----------------------------------------------------------------------------
    def train_step(self, batches) -> float:
        """One optimiser step over `accum_steps` micro-batches; returns the mean loss across ranks."""
        config = self.config
        lr = learning_rate(config, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.dist.device)
        for micro in range(config.accum_steps):
            batch = next(batches)
            last = micro == config.accum_steps - 1
            # DDP all-reduces gradients on the last micro-step only.
            with self.net.no_sync() if self.dist.enabled and not last else contextlib.nullcontext():
                with torch.autocast(self.dist.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss = self.loss(*batch) / config.accum_steps
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

    def averaged_weights(self) -> torch.nn.Module:
        """The weights to export: the EMA's when the run keeps one (a copy), else the model."""
        if not self.ema:
            return self.model
        weights = copy.deepcopy(self.model)
        self.ema.copy_to(weights)
        return weights

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> None:
        config, is_main = self.config, self.dist.is_main
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            record = {"train": dataclasses.asdict(config), "model": json.loads(self.model_config.to_json()),
                      **self.run_record(), "git_commit": git_commit(), "world_size": self.dist.world_size,
                      "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
            (self.run_dir / "config.json").write_text(json.dumps(record, indent=2))
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
            if is_main and (self.step % config.ckpt_every == 0 or self.step == config.steps):
                save_checkpoint(self.run_dir, self.step, self.state(), config.keep_last)
        bar.close()
        if is_main:
            metrics.close()
            self.export()


def main(trainer_cls, config_cls, argv: list[str] | None) -> int:
    """Parse the command line, set up the process group, resume if asked, and run. What the set-up
    refuses (a missing folder or checkpoint, data that does not fit the config) is one line on
    stderr and exit status 2; an error while training keeps its traceback."""
    config, resume = config_cls.from_cli(argv)
    if config.threads:
        torch.set_num_threads(config.threads)
    dist = distributed.setup()
    try:
        try:
            trainer = _set_up(trainer_cls, config, dist, resume)
        except (FileNotFoundError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        trainer.run()
        distributed.wait_for_all(dist)
    finally:
        distributed.teardown(dist)
    return 0


def _set_up(trainer_cls, config, dist, resume: bool):
    """The trainer for `config`, restored from the run folder's last checkpoint when `resume`."""
    trainer = trainer_cls(config, dist)
    if resume:
        path = latest_checkpoint(config.run_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {config.run_dir}/checkpoints")
        trainer.restore(load_checkpoint(path, dist.device))
        if dist.is_main:
            print(f"resumed from {path} at step {trainer.step}", file=sys.stderr)
    return trainer


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
