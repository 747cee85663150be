"""Pure-PyTorch triplane bilinear sampling: the semantic reference.

This is the CoordTok decoder's lookup written out as tensor indexing, op for
op in the order of the paper's public code, so that fp32 results match it to
the last bit. The only deliberate difference: ``coords`` is never modified in
place (the paper's code scales it in place).

Layout (``B`` videos, ``N`` queries per video, ``C`` channels per plane)::

    coords  [B, N, 3]      float, columns (t, x, y), each in [0, 1]
    xy      [B, Rx, Ry, C] indexed by (x, y)
    yt      [B, Rt, Ry, C] indexed by (t, y)
    xt      [B, Rt, Rx, C] indexed by (t, x)
    output  [B, N, 3C]     [sample(xy), sample(yt), sample(xt)]
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["triplane_sample_reference", "sample_plane_reference"]


def sample_plane_reference(plane: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Bilinearly sample one plane with align-corners scaling.

    Args:
        plane: [B, R0, R1, C], already in the compute dtype.
        u: [B, N] coordinates in [0, 1] along the plane's first grid axis.
        v: [B, N] coordinates in [0, 1] along the plane's second grid axis.

    Returns:
        [B, N, C] in ``plane.dtype``.

    The lower neighbour is not clamped (coordinates are assumed in [0, 1]);
    the upper neighbour is clamped to the last row / column.
    """
    _, r0, r1, _ = plane.shape
    s0 = u * (r0 - 1)
    s1 = v * (r1 - 1)
    i0 = torch.floor(s0).long()
    i1 = torch.floor(s1).long()
    j0 = torch.clamp(i0 + 1, max=r0 - 1)
    j1 = torch.clamp(i1 + 1, max=r1 - 1)
    f0 = (s0 - i0.to(s0.dtype)).unsqueeze(-1)
    f1 = (s1 - i1.to(s1.dtype)).unsqueeze(-1)

    batch = torch.arange(plane.shape[0], device=plane.device).unsqueeze(1)
    c00 = plane[batch, i0, i1]
    c01 = plane[batch, i0, j1]
    c10 = plane[batch, j0, i1]
    c11 = plane[batch, j0, j1]

    c0 = c00 * (1 - f1) + c01 * f1
    c1 = c10 * (1 - f1) + c11 * f1
    return c0 * (1 - f0) + c1 * f0


def triplane_sample_reference(xy: Tensor, yt: Tensor, xt: Tensor, coords: Tensor) -> Tensor:
    """Sample the three planes at ``coords`` and concatenate along channels.

    Args:
        xy: [B, Rx, Ry, C] plane indexed by (x, y).
        yt: [B, Rt, Ry, C] plane indexed by (t, y).
        xt: [B, Rt, Rx, C] plane indexed by (t, x).
        coords: [B, N, 3] columns (t, x, y) in [0, 1]. Not modified, and
            treated as a constant (no gradient flows to it).

    Returns:
        [B, N, 3C] in the planes' dtype. Interpolation runs in fp32 for
        half-precision planes (float64 planes stay float64) and the result is
        cast back; gradients w.r.t. the planes come from autograd.

    Input validation lives in :func:`kernels.triplane_sample`.
    """
    compute_dtype = torch.promote_types(xy.dtype, torch.float32)
    coords = coords.detach().to(compute_dtype)
    t, x, y = coords[..., 0], coords[..., 1], coords[..., 2]
    planes = [p.to(compute_dtype) for p in (xy, yt, xt)]
    out = torch.cat(
        [
            sample_plane_reference(planes[0], x, y),
            sample_plane_reference(planes[1], t, y),
            sample_plane_reference(planes[2], t, x),
        ],
        dim=-1,
    )
    return out.to(xy.dtype)
