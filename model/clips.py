"""The clip policy: how a video of any length becomes the model's fixed-length clips, and how the
decoded clips become the video again. The trainer's dataset, the evaluation and the service all
cut and stitch videos through `ClipLayout`, so a model is trained on the clips it serves.

A model takes clips of T frames (`CoordTokConfig.frames`). For a video of L frames:

- Native models (policy "stretch"): every clip the model sees is a full clip of real frames.
  - L >= T: clips start at 0, T, 2T, ...; the last clip ends at the video's last frame (it starts
    at L - T and overlaps the one before it), so no clip is padded.
  - L < T: one clip, the video stretched in time: clip frame j holds source frame
    floor(j * L / T), so source frame i fills clip frames [ceil(iT / L), ceil((i + 1)T / L)) and
    is decoded from the middle of that run. Every latent time cell then holds real frames.
- The authors' checkpoints (`reference_compat`, policy "pad"): consecutive clips, the last padded
  with -1 after its real frames, as the public implementation does for UCF-101.

Stitching: clip k holds source frames [starts[k], starts[k] + lengths[k]); source frame f is
decoded from the last clip that starts at or before f, so every frame comes from exactly one clip
(with an overlapping last clip, the frames it shares with the clip before come from the last clip).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

POLICIES = ("stretch", "pad")


def policy_for(reference_compat: bool) -> str:
    """The clip policy of a model: "pad" for the authors' checkpoints, else "stretch"."""
    return "pad" if reference_compat else "stretch"


@dataclass(frozen=True)
class ClipLayout:
    """Where the clips of one video lie in it: clip k holds source frames
    [starts[k], starts[k] + lengths[k]) and is `frames` long as the model sees it."""

    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    frames: int
    policy: str

    def __post_init__(self) -> None:
        problem = _layout_problem(self.starts, self.lengths, self.frames, self.policy)
        if problem:
            raise ValueError(problem)

    @classmethod
    def plan(cls, total: int, frames: int, policy: str) -> ClipLayout:
        """The layout of a video of `total` frames (see the module docstring)."""
        if total < 1:
            raise ValueError("a video needs at least one frame")
        if policy == "pad":
            starts = tuple(range(0, total, frames))
            return cls(starts, tuple(min(frames, total - s) for s in starts), frames, policy)
        if total < frames:
            return cls((0,), (total,), frames, policy)
        starts = list(range(0, total - frames + 1, frames))
        if starts[-1] + frames < total:
            starts.append(total - frames)
        return cls(tuple(starts), (frames,) * len(starts), frames, policy)

    @property
    def clips(self) -> int:
        return len(self.starts)

    @property
    def total(self) -> int:
        """Frames of the video."""
        return self.starts[-1] + self.lengths[-1]

    def keep(self, k: int) -> tuple[int, int]:
        """Source frames [a, b) that are decoded from clip k."""
        end = self.starts[k + 1] if k + 1 < self.clips else self.total
        return self.starts[k], end

    def clip_frame(self, k: int, source: torch.Tensor) -> torch.Tensor:
        """Source frame indices of clip k [N] -> the clip frames that reconstruct them [N]."""
        local = source - self.starts[k]
        length = self.lengths[k]
        if self.policy == "pad" or length == self.frames:
            return local
        first = (local * self.frames + length - 1) // length  # the run of copies of each frame
        end = ((local + 1) * self.frames + length - 1) // length
        return (first + end - 1) // 2

    def model_n_frames(self) -> torch.Tensor:
        """The valid-frame count [K] that the model's encoder is given per clip: every frame of a
        stretched clip is real; a padded clip has its real frames first."""
        if self.policy == "pad":
            return torch.tensor(self.lengths)
        return torch.full((self.clips,), self.frames)

    def cut(self, video: torch.Tensor) -> torch.Tensor:
        """Frames [L, ...] (L = total) -> clips [K, T, ...]: stretched, or zero-padded after the
        real frames for the "pad" policy (the model sets padded frames to -1 itself)."""
        if len(video) != self.total:
            raise ValueError(f"the layout is for {self.total} frames, got {len(video)}")
        clips = video.new_zeros((self.clips, self.frames, *video.shape[1:]))
        for k, (start, length) in enumerate(zip(self.starts, self.lengths)):
            if self.policy == "pad":
                clips[k, :length] = video[start : start + length]
            else:
                clips[k] = video[start + torch.arange(self.frames) * length // self.frames]
        return clips

    def pieces(self, start: int, stop: int) -> list[tuple[int, tuple[int, int], torch.Tensor]]:
        """Source frames [start, stop) -> for each clip they draw on, in order: (k, the clip frame
        range [a, b) to decode, indices [n] into those b - a decoded frames, one per source frame)."""
        if not 0 <= start < stop <= self.total:
            raise ValueError(f"the frame range [{start}, {stop}) must lie within the {self.total} frames")
        pieces = []
        for k in range(self.clips):
            first, end = self.keep(k)
            a, b = max(start, first), min(stop, end)
            if a < b:
                local = self.clip_frame(k, torch.arange(a, b))
                low = int(local[0])
                pieces.append((k, (low, int(local[-1]) + 1), local - low))
        return pieces

    def stitch(self, clips: torch.Tensor) -> torch.Tensor:
        """Decoded clips [K, T, ...] -> the video [L, ...] (each frame from exactly one clip)."""
        return torch.cat([clips[k, a:b][index] for k, (a, b), index in self.pieces(0, self.total)])


def _layout_problem(starts, lengths, frames: int, policy: str) -> str | None:
    """What is wrong with a layout (None when it is consistent)."""
    if policy not in POLICIES:
        return f"clip policy must be one of {list(POLICIES)}, got {policy!r}"
    if not starts or len(starts) != len(lengths):
        return "a clip layout needs one start and one length per clip"
    if not all(type(v) is int for v in (*starts, *lengths)):
        return "clip starts and lengths must be integers"
    if starts[0] != 0:
        return "the first clip must start at frame 0"
    if not all(1 <= n <= frames for n in lengths):
        return f"clip lengths must lie in [1, {frames}]"
    for k in range(1, len(starts)):
        if not starts[k - 1] < starts[k] <= starts[k - 1] + lengths[k - 1]:
            return f"clip {k} starts at {starts[k]}: clips must start in order, with no gap after the clip before"
    if policy == "stretch" and len(starts) > 1 and min(lengths) < frames:
        return "with the stretch policy only a single-clip video may be shorter than a clip"
    return None
