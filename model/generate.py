"""Generating triplanes with a SiT: the latent space it works in, and the sampling pipeline that the
service and the command line call.

The generator models normalised triplanes: per plane and channel, a tokenizer's latents minus their
mean, over their std (`LatentStats`, stored with the tokenizer's and the generator's weights).
The samplers of `model/transport.py` see a batch of triplanes as flat vectors [B, D]
(`flatten` / `unflatten`: planes xy, yt, xt in turn, each row-major).

    triplane = generate_triplanes(generator, stats, num=4, steps=32, seed=7)
    video = tokenizer.decode_video(triplane)   # [4, T, H, W, 3]
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from coordtok.model.sit import SiT
from coordtok.model.transport import StepCallback, StopCheck, sample
from coordtok.model.triplane import PLANES, Triplane


@dataclass(frozen=True)
class LatentStats:
    """Per plane (xy, yt, xt), the per-channel mean and std [C] of a tokenizer's triplanes.

    JSON as `trainer/export.py` writes it: {"xy": {"mean": [C], "std": [C]}, "yt": ..., "xt": ...}.
    """

    mean: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    std: tuple[torch.Tensor, torch.Tensor, torch.Tensor]

    def __post_init__(self) -> None:
        shapes = {tuple(v.shape) for v in (*self.mean, *self.std)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"latent stats must be [C] vectors of one length per plane, got shapes {sorted(shapes)}")
        if not all(bool(torch.isfinite(s).all() and (s > 0).all()) for s in self.std):
            raise ValueError("latent stats: every std must be finite and positive")

    @property
    def channels(self) -> int:
        return self.mean[0].shape[0]

    @classmethod
    def from_json(cls, text: str) -> LatentStats:
        try:
            values = json.loads(text)
            mean = tuple(torch.tensor(values[p]["mean"], dtype=torch.float32) for p in PLANES)
            std = tuple(torch.tensor(values[p]["std"], dtype=torch.float32) for p in PLANES)
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"latent stats must be JSON {{plane: {{'mean': [C], 'std': [C]}}}}: {error!r}") from None
        return cls(mean, std)

    def to_json(self) -> str:
        return json.dumps({p: {"mean": m.tolist(), "std": s.tolist()} for p, m, s in zip(PLANES, self.mean, self.std)})

    @classmethod
    def measure(cls, triplane: Triplane) -> LatentStats:
        """The statistics of a batch of triplanes, over all their cells."""
        cells = [plane.detach().double().flatten(0, 2) for plane in triplane.planes()]  # [N * R0 * R1, C]
        return cls(
            tuple(c.mean(0).float() for c in cells),
            tuple(c.std(0, correction=0).clamp(min=1e-6).float() for c in cells),
        )

    def normalise(self, triplane: Triplane) -> Triplane:
        return Triplane(*((p - m.to(p)) / s.to(p) for p, m, s in zip(triplane.planes(), self.mean, self.std)))

    def denormalise(self, triplane: Triplane) -> Triplane:
        return Triplane(*(p * s.to(p) + m.to(p) for p, m, s in zip(triplane.planes(), self.mean, self.std)))


def flatten(triplane: Triplane) -> torch.Tensor:
    """Triplane -> [B, D], D = the cells of all three planes times C."""
    return torch.cat([plane.flatten(1) for plane in triplane.planes()], dim=1)


def unflatten(x: torch.Tensor, shapes: tuple[tuple[int, int, int], ...]) -> Triplane:
    """[B, D] -> Triplane with planes of `shapes` (per plane (R0, R1, C), e.g. SiTConfig.plane_shapes)."""
    parts = x.split([math.prod(shape) for shape in shapes], dim=1)
    return Triplane(*(part.reshape(-1, *shape) for part, shape in zip(parts, shapes)))


def video_generator(seed: int, index: int) -> torch.Generator:
    """The CPU random stream of video `index` of a request with `seed` (both >= 0), mixed by
    numpy's SeedSequence: it depends on nothing else (batch, device, process)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]))


@torch.inference_mode()
def generate_triplanes(
    generator: SiT,
    stats: LatentStats,
    num: int,
    steps: int,
    sampler: str = "euler",
    seed: int = 0,
    guidance: float = 1.0,
    label: int | None = None,
    first: int = 0,
    on_step: StepCallback | None = None,
    should_stop: StopCheck | None = None,
) -> Triplane:
    """Sample videos first, ..., first + num - 1 of the request `seed`: their triplanes [num, ...],
    denormalised, on the generator's device, ready for `CoordTok.decode_video`.

    All of video k's randomness (its starting noise, and the draws of the SDE sampler) comes from
    `video_generator(seed, k)` on CPU, so video k is the same generated alone (`first=k, num=1`) or
    in a batch, and after a restart (up to the rounding of batched arithmetic). `label` (a
    class-conditional model's class, the same for every video; None samples the null class) and
    `guidance` (classifier-free guidance scale; 1 is none) condition the velocity. `on_step(i,
    steps)` reports progress; `should_stop()` is asked before every step, and True stops sampling
    with `SamplingCancelled`.
    """
    config = generator.config
    if num < 1 or first < 0 or seed < 0:
        raise ValueError("num must be positive, first and seed non-negative")
    if label is not None and not 0 <= label < config.num_classes:
        raise ValueError(f"label must be in [0, {config.num_classes}) for this generator, got {label}")
    device = next(generator.parameters()).device
    streams = [video_generator(seed, k) for k in range(first, first + num)]
    dim = sum(math.prod(shape) for shape in config.plane_shapes)
    y = None if label is None else torch.full((num,), label, device=device)

    def draw() -> torch.Tensor:  # one N(0, I) draw per video: [num, D]
        return torch.stack([torch.randn(dim, generator=g) for g in streams]).to(device)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return flatten(generator.guided(unflatten(x, config.plane_shapes), t, y, guidance)).float()

    x1 = sample(velocity, draw(), steps, sampler, on_step, should_stop, noise=lambda x: draw())
    return stats.denormalise(unflatten(x1, config.plane_shapes))
