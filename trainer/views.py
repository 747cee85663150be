"""What each training step reconstructs: coordinates and target patches.

Stage 1 samples random patches among a clip's valid frames; stage 2 takes every patch of a run of
whole frames aligned to the decoder's slicing policy (so training sees exactly the patch sets that
`decode_video` decodes together).
"""
from __future__ import annotations

import torch

from coordtok.model.config import CoordTokConfig
from coordtok.model.triplane import frame_coords, patch_counts, video_to_patches


def random_patches(
    video: torch.Tensor, n_frames: torch.Tensor, config: CoordTokConfig, points: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """video [B, T, H, W, 3], n_frames [B] -> coords [B, N, 3], targets [B, N, pt*px*py*3].

    Patch indices are drawn uniformly (with replacement) among the patches of valid frames.
    """
    patches = video_to_patches(video, config)  # [B, nt*nx*ny, V] in frame_coords order
    _, nx, ny = patch_counts(config)
    valid = (n_frames.cpu() // config.dec_patch_t).clamp(min=1) * nx * ny  # [B] valid patches per clip
    index = (torch.rand(len(valid), points, generator=generator) * valid[:, None]).long()  # [B, N]
    coords = frame_coords(config, 0, config.frames)[index]
    index = index.to(video.device)
    targets = torch.gather(patches, 1, index[..., None].expand(-1, -1, patches.shape[-1]))
    return coords.to(video.device), targets


def frame_run(
    video: torch.Tensor, n_frames: torch.Tensor, config: CoordTokConfig, frames: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random run of `frames` whole frames per clip, starting on a multiple of `frames` and
    lying within the valid frames when the clip has that many.

    Returns coords [B, N, 3], targets [B, N, V] and the target frames [B, frames, H, W, 3].
    """
    slots = (n_frames.cpu() // frames).clamp(min=1)  # [B] aligned runs inside the valid frames
    starts = ((torch.rand(len(slots), generator=generator) * slots).long() * frames).tolist()
    coords = torch.stack([frame_coords(config, s, s + frames) for s in starts]).to(video.device)
    clips = torch.stack([video[i, s : s + frames] for i, s in enumerate(starts)])
    targets = video_to_patches(clips, config)
    return coords, targets, clips
