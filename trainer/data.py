"""Training data: folders of video files -> fixed-length clips for CoordTok.

Videos are decoded by `formats.video` (as the server decodes them) and cut into clips of T frames at a
random start. Without augmentation a frame is resized with the paper's policy (short side resized,
centre-cropped); with `Augment`, each clip is a random view (resized square crop, flip, time
reversal, frame stride, short clip). A window shorter than T becomes a full clip by the model's clip
policy (`model.clips`): stretched in time for native models, padded with -1 after its last frame
and returned with its real frame count for the authors' checkpoints (as the paper does for UCF-101).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from coordtok.formats.video import FALLBACK_FPS, MediaError, MediaLimits, VideoInfo, probe, read_frames
from coordtok.model.clips import ClipLayout
from coordtok.model.triplane import from_uint8

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".mpv", ".flv", ".ogv", ".wmv", ".3gp",
     ".mts", ".m2ts", ".gif"}
)
# What "cannot be read" means for a file: the media layer's errors, FFmpeg's own, and I/O errors.
UNREADABLE = (MediaError, av.error.FFmpegError, OSError)


def list_videos(root: str | Path) -> list[Path]:
    """Video files under `root`, recursively and sorted, recognised by extension (case-insensitive).
    Hidden files (names starting with '.', e.g. macOS '._x.mp4' resource forks) are left out, so
    UCF-101's class-folder layout (root/Class/v_Class_g01_c01.avi) works as it is."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"video folder not found: {root}")
    return sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


@dataclass(frozen=True)
class Augment:
    """Random views of the training videos, drawn per item.

    A window of frames is taken at a random frame stride from `strides` (the largest the video
    allows when it is too short for the one drawn); with probability `short` it is a short clip of
    `short_min`..T-1 frames instead. Frames are decoded with their short side at `zoom` times the
    model's frame size, then a square crop whose side is a fraction in [`min_scale`, 1] of the short
    side (at a random place) is resized to the model's frame size. The clip is flipped left-right
    with probability `flip` and played backwards with probability `reverse`.
    """

    min_scale: float = 0.4
    zoom: float = 1.5
    flip: float = 0.5
    reverse: float = 0.5
    strides: tuple[int, ...] = (1, 2, 3)
    short: float = 0.15
    short_min: int = 8

    def __post_init__(self) -> None:
        if not (0 < self.min_scale <= 1 and self.zoom >= 1 and 0 <= self.flip <= 1 and 0 <= self.reverse <= 1
                and 0 <= self.short < 1 and self.short_min >= 1 and self.strides and min(self.strides) >= 1):
            raise ValueError(f"invalid augmentation settings: {self}")


class VideoClips(Dataset):
    """Random clips of `frames` frames at `height` x `width` from a list of video files.

    Item `i` is a clip of file `i % len(files)`; `clips_per_video` repeats the list so that one
    epoch visits long videos several times. Each item returns `(video, n_frames)`: float32
    `[T, H, W, 3]` in [-1, 1] and the number of valid frames the encoder is given (T, except for a
    padded clip under the "pad" clip policy, whose frames past it are -1).

    Clips are taken on a time grid of `fps` frames per second (the source's own rate when None):
    frame `k` of a video is its frame nearest to `k / fps`. The random start (and the random view,
    with `augment`) is drawn from a generator seeded by (seed, epoch, index, file), so a clip
    depends only on those; call `set_epoch` at the start of every epoch (the epoch lives in shared
    memory, so persistent DataLoader workers see it). Without `cache`, only the clip's time range is
    decoded (seeking to its start); with `cache`, each video is decoded whole once and kept in memory
    as uint8, which gives the same clips and suits small corpora (each DataLoader worker holds its
    own cache).

    A file that cannot be read is skipped with one warning, and the item is taken from the next
    readable file in the list instead. `skipped` counts the unreadable files met by this process:
    each DataLoader worker has its own copy of the dataset, so its count is per worker.
    """

    def __init__(
        self,
        files: list[str | Path],
        frames: int,
        height: int,
        width: int,
        fps: float | None = None,
        limits: MediaLimits = MediaLimits(),
        cache: bool = False,
        clips_per_video: int = 1,
        seed: int = 0,
        policy: str = "stretch",
        augment: Augment | None = None,
    ):
        if not files:
            raise ValueError("no video files given")
        if min(frames, height, width, clips_per_video) < 1:
            raise ValueError("frames, height, width and clips_per_video must be positive")
        self.files = [Path(f) for f in files]
        self.frames, self.height, self.width = frames, height, width
        self.fps = fps
        self.limits = limits
        self.cache = cache
        self.clips_per_video = clips_per_video
        self.seed = seed
        self.policy = policy
        self.augment = augment
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._infos: dict[Path, VideoInfo] = {}
        self._videos: dict[Path, np.ndarray] = {}
        self._unreadable: set[Path] = set()

    def __len__(self) -> int:
        return len(self.files) * self.clips_per_video

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose clips the next items are (call before iterating a loader)."""
        self._epoch.fill_(epoch)

    @property
    def skipped(self) -> int:
        """Number of unreadable files found so far by this process."""
        return len(self._unreadable)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """The clip for `index` in the current epoch: (float32 [T, H, W, 3] in [-1, 1], n_frames)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        n = len(self.files)
        for step in range(n):
            file_index = (index + step) % n
            path = self.files[file_index]
            if path in self._unreadable:
                continue
            rng = np.random.default_rng((self.seed, int(self._epoch), index, file_index))
            try:
                window = self._window(path, rng)
            except UNREADABLE as e:
                self._unreadable.add(path)
                log.warning("skipping unreadable video %s: %s: %s", path, type(e).__name__, e)
                continue
            if self.augment:
                window = self._view(window, rng)
            layout = ClipLayout.plan(len(window), self.frames, self.policy)
            clip = layout.cut(from_uint8(torch.from_numpy(window)))[0]
            if layout.policy == "pad":
                clip[len(window):] = -1.0
            return clip, int(layout.model_n_frames()[0])
        raise RuntimeError(f"none of the {n} video files could be read (see the warnings logged for each)")

    def _info(self, path: Path) -> VideoInfo:
        if path not in self._infos:
            self._infos[path] = probe(path, self.limits)
        return self._infos[path]

    def _window(self, path: Path, rng: np.random.Generator) -> np.ndarray:
        """Frames of `path` from a random grid start: uint8 [t, h, w, 3], 1 <= t <= T. With
        `augment` they are every stride-th frame, at the decode size. The start is drawn from the
        header's frame count; if the header over-counts and the window falls past the end, the clip
        starts at frame 0 instead."""
        info = self._info(path)
        rate = self.fps or info.fps or FALLBACK_FPS
        available = info.frames_at(rate)
        frames, stride = self._draw_length(available, rng)
        start = int(rng.integers(0, max(available - frames * stride, 0) + 1))
        window = self._decode(path, info, rate, start, frames * stride)
        if len(window) == 0 and start > 0:
            window = self._decode(path, info, rate, 0, frames * stride)
        if len(window) == 0:
            raise MediaError(f"{path} has no frames")
        return window[::stride]

    def _draw_length(self, available: int, rng: np.random.Generator) -> tuple[int, int]:
        """(frames, stride) of the next window: (T, 1) without `augment`; with it, a short clip's
        length with probability `short`, and a stride the video is long enough for."""
        if not self.augment:
            return self.frames, 1
        a = self.augment
        stride = int(rng.choice(a.strides))
        frames = self.frames
        if self.frames > 1 and rng.random() < a.short:
            frames = int(rng.integers(min(a.short_min, self.frames - 1), self.frames))
        return frames, max(1, min(stride, available // frames))

    def _decode(self, path: Path, info: VideoInfo, rate: float, start: int, length: int) -> np.ndarray:
        """Frames `start .. start+length-1` of `path` on the grid of `rate` fps: uint8 [t, h, w, 3]."""
        size = self._decode_size(info)
        if not self.cache:
            frames, _, _ = read_frames(
                path, self.limits, size=size, resize="crop", fps=rate, start_s=start / rate, max_frames=length
            )
            return frames
        if path not in self._videos:
            self._videos[path], _, _ = read_frames(path, self.limits, size=size, resize="crop", fps=rate)
        return self._videos[path][start:start + length]

    def _decode_size(self, info: VideoInfo) -> tuple[int, int]:
        """The model's frame size, or with `augment` the source's aspect (at most 2:1) with its
        short side at `zoom` times the model's."""
        if not self.augment:
            return self.height, self.width
        short = math.ceil(self.augment.zoom * max(self.height, self.width))
        h, w = max(info.height, 1), max(info.width, 1)
        aspect = min(max(w / h, 0.5), 2.0)
        return (short, round(short * aspect)) if aspect >= 1 else (round(short / aspect), short)

    def _view(self, window: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A random view of a decoded window [t, h, w, 3] (see `Augment`) -> uint8 [t, H, W, 3]."""
        a = self.augment
        h, w = window.shape[1:3]
        side = round(min(h, w) * rng.uniform(a.min_scale, 1.0))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = torch.from_numpy(np.ascontiguousarray(window[:, top:top + side, left:left + side]))
        crop = crop.permute(0, 3, 1, 2).float()  # [t, 3, side, side]
        view = F.interpolate(crop, size=(self.height, self.width), mode="bilinear", antialias=True, align_corners=False)
        view = view.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        if rng.random() < a.flip:
            view = view.flip(2)
        if rng.random() < a.reverse:
            view = view.flip(0)
        return view.contiguous().numpy()
