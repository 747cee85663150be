"""Training data: folders of video files -> fixed-length clips for CoordTok.

Videos are decoded by `service.media` (the server's decoder), resized with the paper's policy
(short side resized, centre-cropped) and cut into clips of T frames at a random start. A video
shorter than T is padded with -1 after its last frame and returned with its real frame count, as
the paper does for UCF-101.
"""
from __future__ import annotations

import logging
from pathlib import Path

import av
import numpy as np
import torch
from torch.utils.data import Dataset

from model.triplane import from_uint8
from service.media import FALLBACK_FPS, MediaError, MediaLimits, VideoInfo, probe, read_frames

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".flv", ".ogv", ".wmv", ".3gp", ".mts", ".m2ts"}
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


class VideoClips(Dataset):
    """Random clips of `frames` frames at `height` x `width` from a list of video files.

    Item `i` is a clip of file `i % len(files)`; `clips_per_video` repeats the list so that one
    epoch visits long videos several times. Each item returns `(video, n_frames)`: float32
    `[T, H, W, 3]` in [-1, 1] and the number of real frames (frames past it are -1).

    Clips are taken on a time grid of `fps` frames per second (the source's own rate when None):
    frame `k` of a video is its frame nearest to `k / fps`. The random start is drawn from a
    generator seeded by (seed, epoch, index, file), so a clip depends only on those; call
    `set_epoch` at the start of every epoch (the epoch lives in shared memory, so persistent
    DataLoader workers see it). Without `cache`, only the clip's time range is decoded (seeking
    to its start); with `cache`, each video is decoded whole once and kept in memory as uint8, which
    gives the same clips and suits small corpora (each DataLoader worker holds its own cache).

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
            return _pad_clip(window, self.frames), len(window)
        raise RuntimeError(f"none of the {n} video files could be read (see the warnings logged for each)")

    def _info(self, path: Path) -> VideoInfo:
        if path not in self._infos:
            self._infos[path] = probe(path, self.limits)
        return self._infos[path]

    def _window(self, path: Path, rng: np.random.Generator) -> np.ndarray:
        """Up to T frames of `path` from a random grid start: uint8 [t, H, W, 3], 1 <= t <= T.
        The start is drawn from the header's frame count; if the header over-counts and the window
        falls past the end, the clip starts at frame 0 instead."""
        info = self._info(path)
        rate = self.fps or info.fps or FALLBACK_FPS
        start = int(rng.integers(0, max(info.frames_at(rate) - self.frames, 0) + 1))
        window = self._decode(path, rate, start)
        if len(window) == 0 and start > 0:
            window = self._decode(path, rate, 0)
        if len(window) == 0:
            raise MediaError(f"{path} has no frames")
        return window

    def _decode(self, path: Path, rate: float, start: int) -> np.ndarray:
        """Frames `start .. start+T-1` of `path` on the grid of `rate` fps: uint8 [t, H, W, 3]."""
        size = (self.height, self.width)
        if not self.cache:
            frames, _, _ = read_frames(
                path, self.limits, size=size, resize="crop", fps=rate, start_s=start / rate, max_frames=self.frames
            )
            return frames
        if path not in self._videos:
            self._videos[path], _, _ = read_frames(path, self.limits, size=size, resize="crop", fps=rate)
        return self._videos[path][start:start + self.frames]


def _pad_clip(window: np.ndarray, frames: int) -> torch.Tensor:
    """uint8 [t, H, W, 3] -> float32 [frames, H, W, 3] in [-1, 1], padded with -1 after frame t."""
    clip = torch.full((frames, *window.shape[1:]), -1.0)
    clip[: len(window)] = from_uint8(torch.from_numpy(window))
    return clip

