"""Test-time latent refinement: the triplane from which a frozen decoder reconstructs a clip best.

Starting from the encoder's triplane, Adam adjusts the three planes (never the model) to lower the
MSE of the reconstruction of the clip's real frames, on one random decoder slice of
`decode_slice_frames` frames per step, decoded by `decode_video` itself (so each step optimises
exactly what decoding computes).

A diagnostic, used by `trainer.evaluate --refine-steps`: the PSNR the refinement adds is the
encoder's share of the reconstruction error (the amortisation gap), what remains is the decoder's.
Refined planes leave the distribution the generator was trained on, and the service serves the
encoder's tokens.
"""
from __future__ import annotations

import torch

from coordtok.model import CoordTok, Triplane


def refine(model: CoordTok, triplane: Triplane, video: torch.Tensor, n_frames: torch.Tensor, steps: int,
           lr: float = 0.01, seed: int = 0) -> Triplane:
    """Refine `triplane` (B clips) towards `video` [B, frames, H, W, 3] in [-1, 1], of which the
    first n_frames [B] frames are real, for `steps` Adam steps -> a new, detached Triplane.

    Deterministic for a given `seed` (the slice order). The model's parameters and gradients are
    left as they were.
    """
    c = model.config
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    slices = c.frames // c.decode_slice_frames
    order = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False), torch.enable_grad():
        planes = [p.detach().clone().float().requires_grad_(True) for p in triplane.planes()]
        target = video.detach().clone().float()
        real = torch.arange(c.frames, device=video.device)[None, :] < n_frames.to(video.device).reshape(-1, 1)  # [B, frames]
        optimizer = torch.optim.Adam(planes, lr=lr)
        for _ in range(steps):
            first = int(torch.randint(slices, (), generator=order)) * c.decode_slice_frames
            last = first + c.decode_slice_frames
            decoded = model.decode_video(Triplane(*planes), frames=(first, last))  # [B, s, H, W, 3]
            weight = real[:, first:last, None, None, None].float()
            loss = (weight * (decoded - target[:, first:last]) ** 2).sum() / weight.sum().clamp(min=1)
            for plane, grad in zip(planes, torch.autograd.grad(loss, planes)):
                plane.grad = grad
            optimizer.step()
    return Triplane(*(p.detach().to(q.dtype) for p, q in zip(planes, triplane.planes())))
