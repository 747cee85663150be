"""The Triplane type, and the one definition of patch coordinates and patch layout.

Coordinates: the decoder reconstructs patches of `pt x px x py` pixels. Patch index i of n along
an axis maps to the normalised coordinate i / (n - 1) in [0, 1] (float32, computed exactly that
way, as the public implementation does). A coordinate row is (t, x, y): x is the height (row)
axis, y the width (column) axis.

Patch values are laid out (pt, px, py, rgb), flattened. Pixels are RGB in [-1, 1] for the model;
`from_uint8` and `to_uint8` convert from and to 8-bit frames.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from coordtok.model.config import CoordTokConfig

PLANES = ("xy", "yt", "xt")


@dataclass
class Triplane:
    """The factorised latent of a batch of clips.

    xy: [B, Rxy, Rxy, C] indexed (x, y); yt: [B, Rt, Rxy, C] indexed (t, y);
    xt: [B, Rt, Rxy, C] indexed (t, x).
    """

    xy: torch.Tensor
    yt: torch.Tensor
    xt: torch.Tensor

    def __post_init__(self) -> None:
        batch = {p.shape[0] for p in self.planes()}
        if len(batch) != 1 or any(p.dim() != 4 for p in self.planes()):
            raise ValueError(
                "Triplane planes must be 4-D [B, R0, R1, C] with one batch size, got "
                + ", ".join(f"{n} {tuple(p.shape)}" for n, p in zip(PLANES, self.planes()))
            )

    def planes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.xy, self.yt, self.xt

    @property
    def batch_size(self) -> int:
        return self.xy.shape[0]

    def to(self, *args, **kwargs) -> Triplane:
        return Triplane(*(p.to(*args, **kwargs) for p in self.planes()))

    def __getitem__(self, index) -> Triplane:
        """Select clips along the batch axis (an int keeps the axis)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Triplane(*(p[index] for p in self.planes()))

    @staticmethod
    def cat(triplanes: list[Triplane]) -> Triplane:
        return Triplane(*(torch.cat(planes) for planes in zip(*(t.planes() for t in triplanes))))

    def split(self, sizes: list[int]) -> list[Triplane]:
        """Cut the batch into consecutive groups of `sizes` clips."""
        return [Triplane(*parts) for parts in zip(*(p.split(sizes) for p in self.planes()))]


def from_uint8(frames: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., 3] -> float32 in [-1, 1]."""
    return frames.float() / 127.5 - 1.0


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] (clamped) -> uint8, rounded."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def patch_counts(config: CoordTokConfig) -> tuple[int, int, int]:
    """Decoder patches along (t, x, y)."""
    return (
        config.frames // config.dec_patch_t,
        config.height // config.dec_patch_xy,
        config.width // config.dec_patch_xy,
    )


def normalise(index: torch.Tensor, count: int) -> torch.Tensor:
    """Patch index i of `count` -> i / (count - 1) in float32 (0 when count is 1)."""
    return index / max(count - 1, 1)


def frame_coords(config: CoordTokConfig, start: int, stop: int) -> torch.Tensor:
    """Coordinates of every patch in frames [start, stop): [N, 3] (t, x, y), row-major order.

    `start` and `stop` must be multiples of the decoder's temporal patch size.
    """
    pt = config.dec_patch_t
    if start % pt or stop % pt or not 0 <= start < stop <= config.frames:
        raise ValueError(f"frame range [{start}, {stop}) must lie in [0, {config.frames}] on multiples of {pt}")
    nt, nx, ny = patch_counts(config)
    t, x, y = torch.meshgrid(
        torch.arange(start // pt, stop // pt), torch.arange(nx), torch.arange(ny), indexing="ij"
    )
    return torch.stack(
        [normalise(t.flatten(), nt), normalise(x.flatten(), nx), normalise(y.flatten(), ny)], dim=-1
    )


def patch_indices(coords: torch.Tensor, config: CoordTokConfig) -> torch.Tensor:
    """Recover integer patch indices [..., 3] from normalised coordinates [..., 3].

    Rounds to the nearest index; with `reference_compat` it truncates, as the public
    implementation does (which is off by one for some counts that are not powers of two).
    """
    scale = torch.tensor([max(n - 1, 1) for n in patch_counts(config)], dtype=coords.dtype, device=coords.device)
    scaled = coords * scale
    if not config.reference_compat:
        scaled = scaled.round()
    return scaled.long()


def video_to_patches(video: torch.Tensor, config: CoordTokConfig) -> torch.Tensor:
    """[B, T, H, W, 3] -> [B, T/pt * H/px * W/py, pt*px*py*3] in frame_coords order."""
    b, t, h, w, _ = video.shape
    pt, p = config.dec_patch_t, config.dec_patch_xy
    x = video.reshape(b, t // pt, pt, h // p, p, w // p, p, 3)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)  # [B, nt, nx, ny, pt, px, py, 3]
    return x.reshape(b, (t // pt) * (h // p) * (w // p), pt * p * p * 3)


def patches_to_video(patches: torch.Tensor, config: CoordTokConfig) -> torch.Tensor:
    """[B, nt*nx*ny, pt*px*py*3] in frame_coords order -> [B, nt*pt, H, W, 3]."""
    b = patches.shape[0]
    pt, p = config.dec_patch_t, config.dec_patch_xy
    _, nx, ny = patch_counts(config)
    nt = patches.shape[1] // (nx * ny)
    x = patches.reshape(b, nt, nx, ny, pt, p, p, 3)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7)  # [B, nt, pt, nx, px, ny, py, 3]
    return x.reshape(b, nt * pt, nx * p, ny * p, 3)
