"""CoordTok: encode a video into a triplane, decode any patch from its (t, x, y) coordinate.

Encoder: 3D patches -> ViT -> triplane query tokens cross-attend to the video tokens -> per-plane
projection and unpatchify. Decoder: bilinear triplane sampling at patch coordinates -> linear
embedding + learned position embedding -> ViT across the patches decoded together -> pixels.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from coordtok.kernels import triplane_sample
from coordtok.model.config import CoordTokConfig
from coordtok.model.layers import BLOCK_EPS, Block, CrossBlock
from coordtok.model.triplane import PLANES, Triplane, frame_coords, patch_counts, patch_indices, patches_to_video


class PlaneQueries(nn.Module):
    """Learnable query tokens of one plane [1, R0, R1, C], patchified into [g0*g1, D] tokens,
    and the projection of the encoder's output tokens back to the plane."""

    def __init__(self, res: tuple[int, int], patch: tuple[int, int], channels: int, dim: int) -> None:
        super().__init__()
        self.res, self.patch, self.channels = res, patch, channels
        self.grid = (res[0] // patch[0], res[1] // patch[1])
        self.query = nn.Parameter(torch.randn(1, *res, channels))
        self.embed = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.project = nn.Linear(dim, patch[0] * patch[1] * channels)

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def tokens(self) -> torch.Tensor:
        return self.embed(self.query.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)  # [1, g0*g1, D]

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, g0*g1, D] -> [B, R0, R1, C]; each token fills a p0 x p1 x C patch."""
        (g0, g1), (p0, p1) = self.grid, self.patch
        x = self.project(tokens).reshape(-1, g0, g1, p0, p1, self.channels)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, g0 * p0, g1 * p1, self.channels)


class Encoder(nn.Module):
    def __init__(self, c: CoordTokConfig) -> None:
        super().__init__()
        self.config = c
        patch = (c.enc_patch_t, c.enc_patch_xy, c.enc_patch_xy)
        self.grid = (c.frames // patch[0], c.height // patch[1], c.width // patch[2])
        num_patches = math.prod(self.grid)
        self.video_patch_embed = nn.Conv3d(3, c.enc_dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.enc_dim))
        self.video_pos_embed = nn.Parameter(torch.zeros(1, num_patches, c.enc_dim))
        self.video_blocks = nn.ModuleList(
            Block(c.enc_dim, c.enc_heads, qkv_bias=False) for _ in range(c.enc_vit_layers)
        )
        self.video_norm = nn.LayerNorm(c.enc_dim)
        self.memory_pos_embed = nn.Parameter(torch.zeros(1, num_patches, c.enc_dim))

        xy, t = c.latent_res_xy, c.latent_res_t
        pxy, pt = c.latent_patch_xy, c.latent_patch_t
        self.planes = nn.ModuleDict({
            "xy": PlaneQueries((xy, xy), (pxy, pxy), c.latent_channels, c.enc_dim),
            "yt": PlaneQueries((t, xy), (pt, pxy), c.latent_channels, c.enc_dim),
            "xt": PlaneQueries((t, xy), (pt, pxy), c.latent_channels, c.enc_dim),
        })
        self.cross_blocks = nn.ModuleList(CrossBlock(c.enc_dim, c.enc_heads) for _ in range(c.enc_cross_layers))
        self.cross_norm = nn.LayerNorm(c.enc_dim, eps=BLOCK_EPS)

    def padding_mask(self, n_frames: torch.Tensor) -> torch.Tensor:
        """Per video token [B, t*h*w]: bool True where valid, or with `reference_compat` the
        public implementation's float mask (1.0 on padded tokens, added to the logits)."""
        t, h, w = self.grid
        index = torch.arange(t, device=n_frames.device)
        if self.config.reference_compat:
            padded = index >= (n_frames // self.config.enc_patch_t)[:, None]
            return padded.repeat_interleave(h * w, dim=1).float()
        # A temporal token is valid when it holds at least one real frame.
        valid = index < -(-n_frames // self.config.enc_patch_t)[:, None]
        return valid.repeat_interleave(h * w, dim=1)

    def forward(self, video: torch.Tensor, n_frames: torch.Tensor) -> Triplane:
        b = video.shape[0]
        x = self.video_patch_embed(video.permute(0, 4, 1, 2, 3))  # [B, D, t, h, w]
        x = x.flatten(2).transpose(1, 2) + self.video_pos_embed  # [B, t*h*w, D]
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        mask = self.padding_mask(n_frames)
        vit_mask = None
        if mask.dtype == torch.bool:
            vit_mask = torch.cat([mask.new_ones(b, 1), mask], dim=1)
        for block in self.video_blocks:
            x = block(x, key_mask=vit_mask)
        memory = self.video_norm(x[:, 1:]) + self.memory_pos_embed  # [B, t*h*w, D]

        queries = torch.cat([self.planes[name].tokens() for name in PLANES], dim=1)
        q = queries.expand(b, -1, -1).to(memory.dtype)  # [B, sum(g0*g1), D]
        for block in self.cross_blocks:
            q = block(q, memory, mask)
        q = self.cross_norm(q)
        sizes = [self.planes[name].num_tokens for name in PLANES]
        return Triplane(*(self.planes[name].unpatchify(part) for name, part in zip(PLANES, q.split(sizes, dim=1))))


class Decoder(nn.Module):
    def __init__(self, c: CoordTokConfig) -> None:
        super().__init__()
        self.config = c
        self.embed = nn.Linear(3 * c.latent_channels, c.dec_dim)
        if c.dec_pos_embed == "full":
            self.pos_embed = nn.Parameter(torch.zeros(1, *patch_counts(c), c.dec_dim))  # [1, nt, nx, ny, D]
        else:  # one table per axis: [nt, D], [nx, D], [ny, D]
            self.pos_embed_axes = nn.ParameterList(nn.Parameter(torch.zeros(n, c.dec_dim)) for n in patch_counts(c))
        self.blocks = nn.ModuleList(Block(c.dec_dim, c.dec_heads, qkv_bias=True) for _ in range(c.dec_layers))
        self.norm = nn.LayerNorm(c.dec_dim)
        self.to_pixels = nn.Linear(c.dec_dim, c.patch_values)

    def forward(self, triplane: Triplane, coords: torch.Tensor) -> torch.Tensor:
        """coords [B, N, 3] (t, x, y) in [0, 1] -> patches [B, N, pt*px*py*3]."""
        features = triplane_sample(*triplane.planes(), coords)  # [B, N, 3C]
        h = self.embed(features) + self.position(coords).to(features.dtype)  # [B, N, D]
        for block in self.blocks:
            h = block(h)
        return self.to_pixels(self.norm(h))

    def position(self, coords: torch.Tensor) -> torch.Tensor:
        """The learned position embedding of the patches at coords [B, N, 3] -> [B, N, D]."""
        t, x, y = patch_indices(coords, self.config).unbind(-1)
        if self.config.dec_pos_embed == "full":
            return self.pos_embed[0, t, x, y]
        table_t, table_x, table_y = self.pos_embed_axes
        return table_t[t] + table_x[x] + table_y[y]


class CoordTok(nn.Module):
    def __init__(self, config: CoordTokConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.apply(_init_module)
        for name, param in self.named_parameters():
            if "pos_embed" in name or name.endswith("cls_token"):
                nn.init.trunc_normal_(param, std=0.02)

    def encode(self, video: torch.Tensor, n_frames: torch.Tensor | None = None) -> Triplane:
        """video [B, T, H, W, 3] in [-1, 1] (T <= frames), n_frames [B] or [B, 1] valid frames
        per clip (default T) -> Triplane. Frames at or past n_frames are padding: they are set to
        -1 (the paper's padding value), so their content never matters."""
        c = self.config
        if video.dim() != 5 or tuple(video.shape[2:]) != (c.height, c.width, 3) or not 1 <= video.shape[1] <= c.frames:
            raise ValueError(f"video must be [B, T<={c.frames}, {c.height}, {c.width}, 3], got {tuple(video.shape)}")
        b, t = video.shape[:2]
        if n_frames is None:
            n_frames = torch.full((b,), t, device=video.device)
        n_frames = n_frames.reshape(b).to(device=video.device, dtype=torch.long)
        if bool(((n_frames < 1) | (n_frames > t)).any()):
            raise ValueError(f"n_frames must be in [1, {t}], got {n_frames.tolist()}")
        if t < c.frames:
            video = torch.cat([video, video.new_full((b, c.frames - t, *video.shape[2:]), -1.0)], dim=1)
        padded = torch.arange(c.frames, device=video.device)[None, :] >= n_frames[:, None]  # [B, frames]
        video = video.masked_fill(padded[:, :, None, None, None], -1.0)
        return self.encoder(video, n_frames)

    def decode(self, triplane: Triplane, coords: torch.Tensor) -> torch.Tensor:
        """coords [B, N, 3] (t, x, y) normalised patch coordinates -> [B, N, pt*px*py*3].

        The patches of one call attend to each other: the output depends on the set decoded together.
        """
        if coords.dim() != 3 or coords.shape[-1] != 3 or coords.shape[0] != triplane.batch_size:
            raise ValueError(f"coords must be [{triplane.batch_size}, N, 3], got {tuple(coords.shape)}")
        low, high = coords.aminmax()
        if low < 0 or high > 1:
            raise ValueError("coords must lie in [0, 1]")
        return self.decoder(triplane, coords.float())

    def decode_video(
        self, triplane: Triplane, frames: tuple[int, int] | None = None, slice_frames: int | None = None
    ) -> torch.Tensor:
        """Reconstruct frames [a, b) (default all) -> [B, b - a, H, W, 3], values about [-1, 1].

        Slicing policy: the clip is cut into fixed slices [k*s, (k+1)*s) with s = slice_frames
        (default `config.decode_slice_frames`, the frames per view of stage-2 training), and
        every patch of a slice is decoded in one pass. Each requested frame is computed within its
        whole slice, so a frame's pixels never depend on which range was asked for: decoding
        [a, b) equals frames a..b-1 of a full decode. Only the slices that overlap [a, b) run.
        """
        c = self.config
        start, stop = frames or (0, c.frames)
        s = slice_frames or c.decode_slice_frames
        if not 0 <= start < stop <= c.frames:
            raise ValueError(f"frames must satisfy 0 <= a < b <= {c.frames}, got [{start}, {stop})")
        if s % c.dec_patch_t or not 1 <= s <= c.frames:
            raise ValueError(f"slice_frames must be a multiple of {c.dec_patch_t} in [1, {c.frames}]")
        b = triplane.batch_size
        device = triplane.xy.device
        pieces = []
        for first in range(start // s * s, stop, s):
            last = min(first + s, c.frames)
            coords = frame_coords(c, first, last).to(device).expand(b, -1, -1)
            video = patches_to_video(self.decoder(triplane, coords), c)  # [B, last - first, H, W, 3]
            pieces.append(video[:, max(start, first) - first : min(stop, last) - first])
        return torch.cat(pieces, dim=1)

    def forward(self, video: torch.Tensor, n_frames: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Training step body: encode, then reconstruct the patches at `coords` [B, N, 3]."""
        return self.decoder(self.encode(video, n_frames), coords)


def _init_module(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
