"""Training checkpoints: written atomically, the last K kept, loaded without unpickling objects.

A checkpoint holds everything needed to continue exactly: model, optimiser, grad scaler, EMA,
step, RNG states and the data position.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

PATTERN = "step_*.pt"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep_last: int) -> Path:
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in sorted(folder.glob(PATTERN))[:-keep_last]:
        old.unlink()
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = sorted(checkpoint_dir(run_dir).glob(PATTERN))
    return found[-1] if found else None


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict:
    return torch.load(str(path), map_location=device, weights_only=True)
