"""SiT over CoordTok triplanes: the paper's generator (Ma et al. 2024's Scalable Interpolant
Transformer, a DiT with adaLN-Zero blocks that predicts a velocity; the flow it is trained on and
sampled from is in `model/transport.py`).

Tokens: every plane [B, R0, R1, C] is cut into p x p patches, each embedded by the plane's own
strided convolution: xy gives (Rxy/p)^2 tokens, yt and xt (Rt/p)(Rxy/p) each (64 + 2 x 128 = 320
for the paper's triplane at p = 2). Positions: a fixed 2D sine-cosine table on the xy grid, one
learned table shared by yt and xt (their grids are the same (t, space) grid), and a learned
embedding of the plane type. One transformer runs over all tokens [xy | yt | xt], conditioned on
the time (and class) through adaLN-Zero; a final adaLN layer per plane maps its tokens back to
patches of that plane.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from coordtok.model.config import SiTConfig
from coordtok.model.layers import BLOCK_EPS, MLP, Attention
from coordtok.model.triplane import PLANES, Triplane


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, L, D] shifted and scaled per sample by shift, scale [B, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """The MAE/DiT 2D sine-cosine table of a g0 x g1 grid, row-major: [g0 * g1, dim]; the first
    half of the channels encodes the row, the second the column."""
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def axis(n: int) -> torch.Tensor:  # [n, dim / 2]
        angles = torch.arange(n, dtype=torch.float64)[:, None] * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    (g0, g1), half = grid, dim // 2
    rows = axis(g0)[:, None].expand(g0, g1, half)
    cols = axis(g1)[None, :].expand(g0, g1, half)
    return torch.cat([rows, cols], dim=-1).reshape(g0 * g1, dim).float()


class TimestepEmbedder(nn.Module):
    """t [B] in [0, 1] -> [B, D]: DiT's sinusoidal features of t through a two-layer MLP."""

    def __init__(self, dim: int, frequencies: int = 256) -> None:
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        rates = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[:, None] * rates  # [B, half]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))


class SiTBlock(nn.Module):
    """adaLN-Zero transformer block: the conditioning [B, D] sets a shift, a scale and a gate of the
    attention and of the MLP branch; the gates start at zero, so the block starts as the identity."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=BLOCK_EPS)
        self.attn = Attention(dim, heads, qkv_bias=True, proj_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=BLOCK_EPS)
        self.mlp = MLP(dim, mlp_ratio)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class PlanePatches(nn.Module):
    """One plane's way into and out of the transformer: patches -> tokens by a strided convolution;
    tokens -> patches by a final adaLN layer (zero-initialised) and unpatchify."""

    def __init__(self, shape: tuple[int, int, int], patch: int, dim: int) -> None:
        super().__init__()
        r0, r1, self.channels = shape
        self.patch, self.grid = patch, (r0 // patch, r1 // patch)
        self.embed = nn.Conv2d(self.channels, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=BLOCK_EPS)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.project = nn.Linear(dim, patch * patch * self.channels)

    def tokens(self, plane: torch.Tensor) -> torch.Tensor:
        """[B, R0, R1, C] -> [B, g0 * g1, D], row-major over the patch grid."""
        return self.embed(plane.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)

    def plane(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """[B, g0 * g1, D] and the conditioning [B, D] -> [B, R0, R1, C]."""
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        x = self.project(modulate(self.norm(tokens), shift, scale))  # [B, g0 * g1, p * p * C]
        (g0, g1), p = self.grid, self.patch
        x = x.reshape(-1, g0, g1, p, p, self.channels).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, g0 * p, g1 * p, self.channels)


class SiT(nn.Module):
    def __init__(self, config: SiTConfig) -> None:
        super().__init__()
        self.config = c = config
        self.planes = nn.ModuleDict(
            {name: PlanePatches(shape, c.patch, c.dim) for name, shape in zip(PLANES, c.plane_shapes)}
        )
        self.register_buffer("xy_pos", sincos_2d(c.dim, self.planes["xy"].grid), persistent=False)  # [Lxy, D]
        # Learned, shared by yt and xt, and started from the sine-cosine table of their grid.
        self.time_pos = nn.Parameter(sincos_2d(c.dim, self.planes["yt"].grid))  # [Lt, D]
        self.plane_type = nn.Parameter(torch.zeros(len(PLANES), c.dim))
        self.t_embed = TimestepEmbedder(c.dim)
        # Rows 0 .. num_classes - 1 embed the classes, row num_classes the null class.
        self.y_embed = nn.Embedding(c.num_classes + 1, c.dim) if c.num_classes else None
        self.blocks = nn.ModuleList(SiTBlock(c.dim, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self._init_weights()

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, x: Triplane, t: torch.Tensor, y: torch.Tensor | None = None) -> Triplane:
        """The velocity at x, a batch of (normalised) triplanes at times t [B] in [0, 1], with class
        labels y [B] (None: unconditional; for a class-conditional model, the null class).
        Returns a Triplane of x's shapes."""
        shapes = tuple(tuple(p.shape[1:]) for p in x.planes())
        if shapes != self.config.plane_shapes:
            raise ValueError(f"SiT expects planes {self.config.plane_shapes}, got {shapes}")
        positions = (self.xy_pos, self.time_pos, self.time_pos)
        tokens = [
            self.planes[name].tokens(plane) + (pos + self.plane_type[i]).to(plane.dtype)
            for i, (name, plane, pos) in enumerate(zip(PLANES, x.planes(), positions))
        ]
        h = torch.cat(tokens, dim=1)  # [B, L, D]
        c = self.condition(t, y)  # [B, D]
        for block in self.blocks:
            h = block(h, c)
        parts = h.split([part.shape[1] for part in tokens], dim=1)
        return Triplane(*(self.planes[name].plane(part, c) for name, part in zip(PLANES, parts)))

    def condition(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The adaLN conditioning [B, D]: time embedding plus class embedding."""
        c = self.t_embed(t)
        if self.y_embed is None:
            if y is not None:
                raise ValueError("this SiT is unconditional: pass no class labels")
            return c
        if y is None:
            y = torch.full_like(t, self.null_class, dtype=torch.long)
        return c + self.y_embed(y)

    def guided(self, x: Triplane, t: torch.Tensor, y: torch.Tensor | None, scale: float) -> Triplane:
        """Classifier-free guidance: v_null + scale * (v_cond - v_null), the conditional and the null
        pass run as one batch of 2B. Scale 1 is the plain velocity (one pass of batch B)."""
        if scale == 1.0:
            return self(x, t, y)
        if y is None:
            raise ValueError("classifier-free guidance needs class labels")
        b = x.batch_size
        both = self(Triplane.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.null_class)]))
        cond, null = both.split([b, b])
        return Triplane(*(n + scale * (v - n) for v, n in zip(cond.planes(), null.planes())))

    def drop_labels(self, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training labels y [B] with each replaced by the null class with probability
        `class_dropout_prob` (drawn on CPU from `generator`), so the model also learns v_null."""
        drop = torch.rand(y.shape, generator=generator) < self.config.class_dropout_prob
        return torch.where(drop.to(y.device), self.null_class, y)

    def _init_weights(self) -> None:
        """DiT's initialisation: Xavier linear layers and patch embeddings, N(0, 0.02) embeddings,
        and zeros on every adaLN modulation and final projection (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for plane in self.planes.values():
            nn.init.xavier_uniform_(plane.embed.weight.view(plane.embed.out_channels, -1))
            nn.init.zeros_(plane.embed.bias)
        for layer in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.normal_(self.plane_type, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        zeroed = [block.modulation[-1] for block in self.blocks]
        zeroed += [layer for plane in self.planes.values() for layer in (plane.modulation[-1], plane.project)]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
