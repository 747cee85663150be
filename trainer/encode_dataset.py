"""Tokenize a dataset: every video under a folder -> token shards and a manifest (trainer/token_shards.py).

    coordtok encode-dataset videos/ -o tokens/
    torchrun --nproc_per_node=8 --no-python coordtok encode-dataset videos/ -o tokens/ --workers 4
    python -m coordtok.trainer.generator --tokens tokens/ --run-dir runs/gen

Files: `trainer.data.list_videos` (recursive, sorted, by extension, hidden files left out, so
UCF-101's class folders work as they are), cut into shards of `shard_size` consecutive files. Each
video is read as `/v1/encode` reads an upload by default: decoded whole at the model's frame size
(short side resized, centre crop), at its own frame rate or at `fps`, and cut into clips by the
model's clip policy (`ClipLayout.plan`). A file that cannot be read (`trainer.data.UNREADABLE`, or
one without frames) is listed in the manifest with the reason, and the run goes on.

Processes: under torchrun, rank r of W encodes shards r, r + W, r + 2W, ... on cuda:LOCAL_RANK (the
CPU without GPUs). The ranks never wait for each other (a barrier would time out while a slower
rank still encodes): whichever finds every shard written when it ends writes manifest.jsonl. In a
process, DataLoader workers decode the videos ahead of the encoder (`workers`; 0 decodes in the
process itself), and a shard's clips are encoded `batch` at a time counted from the shard's first
clip, so its tokens depend neither on the number of processes nor on where an earlier run stopped.

Resuming: shards are written atomically and a run skips those that exist; one that exists for
other files or settings stops the run with an error saying so (the folder's files changed, or
another model or fps: write to a new folder). `max_shards` ends a run after that many shards, for
jobs with a time limit; the next run continues.

Limits: a video over `limits` (`MediaLimits`: frames, duration, frame size; the service's defaults
unless set) is listed in the manifest as unreadable, with the limit it crossed.

Memory: a video is held whole at the model's frame size (at most `limits.max_frames` frames) while
its clips are encoded, and each worker decodes up to two videos ahead.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from coordtok.formats.tokens import plane_shapes
from coordtok.formats.geometry import Geometry
from coordtok.formats.video import FALLBACK_FPS, CorruptMedia, MediaLimits, VideoInfo, check_fps, read_frames
from coordtok.model import CoordTok, Triplane
from coordtok.model.clips import ClipLayout, policy_for
from coordtok.model.triplane import from_uint8
from coordtok.trainer import distributed, token_shards
from coordtok.trainer.data import UNREADABLE, VIDEO_EXTENSIONS, list_videos
from coordtok.trainer.loop import autocast_dtype
from coordtok.trainer.token_shards import ShardSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tokenizer:
    """The model that encodes, and its identity as the manifest names it."""

    model: CoordTok
    model_id: str
    weights_sha256: str


@dataclass(frozen=True)
class EncodeOptions:
    shard_size: int = 64  # videos per shard
    batch: int = 16  # clips per forward pass
    workers: int = 2  # DataLoader processes decoding videos (0: decode in this process)
    fps: float | None = None  # resample videos to this rate (None: each video's own)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16
    max_shards: int | None = None  # end this run after encoding that many shards (None: all)
    limits: MediaLimits = MediaLimits()  # a video over these (frames, duration, size) is listed as unreadable
    progress: bool = True  # a progress bar on rank 0

    def __post_init__(self) -> None:
        if min(self.shard_size, self.batch, self.max_shards or 1) < 1 or self.workers < 0:
            raise ValueError("shard size, batch and max shards must be 1 or more, workers 0 or more")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, not {self.precision!r}")
        if self.fps is not None:
            check_fps(self.fps, "--fps")


@dataclass(frozen=True)
class Summary:
    """What one process did."""

    rank: int
    shards: int  # in the dataset
    written: int  # shards this process encoded now
    found: int  # shards of this process that an earlier run had written
    clips: int
    unreadable: int
    seconds: float
    complete: bool  # every shard is written (and the manifest with them)

    def text(self, out: str | Path) -> str:
        rate = f" ({self.clips / self.seconds:.1f} clips/s)" if self.clips else ""
        done = (f"{out} holds all {self.shards} shard(s) and {token_shards.MANIFEST}" if self.complete
                else f"{out} is not finished: run the same command again to continue")
        skipped = f"; {self.unreadable} unreadable video(s) skipped (listed in the manifest)" if self.unreadable else ""
        return (f"encoded {self.clips} clip(s) into {self.written} shard(s) in {self.seconds:.1f} s{rate}, "
                f"{self.found} found written{skipped}; {done}")


@dataclass(frozen=True)
class DecodedVideo:
    """One video as a DataLoader worker hands it over: its clips (uint8 [K, T, H, W, 3]) and how
    they lie in it, or the reason it could not be read."""

    source: str
    clips: torch.Tensor | None = None
    layout: ClipLayout | None = None
    info: VideoInfo | None = None
    geometry: Geometry | None = None
    error: str | None = None


class VideoFiles(Dataset):
    """Item i: the video `root / sources[i]` decoded at the model's frame size and cut into its clips."""

    def __init__(self, root: Path, sources: list[str], model: CoordTok, fps: float | None,
                 limits: MediaLimits) -> None:
        self.root, self.sources, self.fps, self.limits = root, sources, fps, limits
        c = model.config
        self.frames, self.size, self.policy = c.frames, (c.height, c.width), policy_for(c.reference_compat)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> DecodedVideo:
        source = self.sources[index]
        try:
            frames, info, geometry = read_frames(self.root / source, self.limits, size=self.size, resize="crop", fps=self.fps)
            if len(frames) == 0:
                raise CorruptMedia("the video has no frames")
        except UNREADABLE as error:
            return DecodedVideo(source, error=f"{type(error).__name__}: {error}")
        layout = ClipLayout.plan(len(frames), self.frames, self.policy)
        return DecodedVideo(source, layout.cut(torch.from_numpy(frames)), layout, info, geometry)


class ShardEncoder:
    """Encodes the clips of one shard `batch` at a time, in the order they are added."""

    def __init__(self, model: CoordTok, batch: int, amp_dtype: torch.dtype | None) -> None:
        self.model, self.batch, self.amp_dtype = model, batch, amp_dtype
        self.device = next(model.parameters()).device
        self.clips: list[torch.Tensor] = []  # waiting: uint8 [k, T, H, W, 3] each
        self.n_frames: list[torch.Tensor] = []
        self.encoded: list[Triplane] = []
        self.added = 0

    @property
    def done(self) -> int:
        """Clips encoded so far."""
        return sum(triplane.batch_size for triplane in self.encoded)

    def add(self, clips: torch.Tensor, n_frames: torch.Tensor) -> None:
        self.clips.append(clips)
        self.n_frames.append(n_frames)
        self.added += len(clips)
        if sum(len(c) for c in self.clips) >= self.batch:
            self._encode_batches(whole_only=True)

    def finish(self) -> Triplane:
        """Every added clip's triplane, in order (CPU, float32)."""
        self._encode_batches(whole_only=False)
        if not self.encoded:  # a shard of unreadable videos only
            return Triplane(*(torch.empty(0, *shape) for shape in plane_shapes(self.model.config).values()))
        return Triplane.cat(self.encoded)

    def _encode_batches(self, whole_only: bool) -> None:
        if not self.clips:
            return
        clips, n_frames = torch.cat(self.clips), torch.cat(self.n_frames)
        end = len(clips) - len(clips) % self.batch if whole_only else len(clips)
        for start in range(0, end, self.batch):
            self.encoded.append(self._encode(clips[start:start + self.batch], n_frames[start:start + self.batch]))
        self.clips, self.n_frames = ([clips[end:]], [n_frames[end:]]) if end < len(clips) else ([], [])

    @torch.inference_mode()
    def _encode(self, clips: torch.Tensor, n_frames: torch.Tensor) -> Triplane:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            triplane = self.model.encode(from_uint8(clips.to(self.device)), n_frames.to(self.device))
        return triplane.to("cpu", torch.float32)


def plan_shards(root: Path, tokenizer: Tokenizer, options: EncodeOptions, precision: str) -> list[ShardSpec]:
    """The shards of the videos under `root`: shard s holds files [s * shard_size, (s + 1) * shard_size)
    of the sorted list."""
    sources = [path.relative_to(root).as_posix() for path in list_videos(root)]
    if not sources:
        raise ValueError(f"no video files under {root} (looked for {', '.join(sorted(VIDEO_EXTENSIONS))})")
    c = tokenizer.model.config
    settings = {"model_id": tokenizer.model_id, "weights_sha256": tokenizer.weights_sha256, "frames_per_clip": c.frames,
                "size": [c.height, c.width], "resize": "crop", "clip_policy": policy_for(c.reference_compat),
                "fps": options.fps, "precision": precision}
    size = options.shard_size
    chunks = [tuple(sources[start:start + size]) for start in range(0, len(sources), size)]
    return [ShardSpec(index, len(chunks), chunk, settings) for index, chunk in enumerate(chunks)]


def is_written(out: Path, spec: ShardSpec) -> bool:
    """Whether shard `spec` exists in `out`; ValueError when a shard of that number exists for other
    files or settings."""
    path = token_shards.shard_path(out, spec.index)
    if not path.exists():
        return False
    found, _ = token_shards.read_header(path)
    if found != spec:
        what = "files" if found.sources != spec.sources or found.shards != spec.shards else "settings"
        raise ValueError(f"{path} was written for other {what} than this run's ({_difference(found, spec)}): the "
                         "videos or options changed since; write to a new -o folder, or run with the same ones")
    return True


def _difference(found: ShardSpec, planned: ShardSpec) -> str:
    if found.shards != planned.shards:
        return f"{found.shards} shards then, {planned.shards} now"
    if found.sources != planned.sources:
        return f"its first file was {found.sources[0]}, now {planned.sources[0]}"
    changed = sorted(k for k in planned.settings if found.settings.get(k) != planned.settings[k])
    return ", ".join(f"{k} {found.settings.get(k)!r} then, {planned.settings[k]!r} now" for k in changed)


def clip_rows(video: DecodedVideo, shard: int, first_index: int, tokenizer: Tokenizer, fps: float | None) -> list[dict]:
    """The manifest rows of one video (see trainer/token_shards.py): one per clip, or its error."""
    if video.error is not None:
        return [{"source": video.source, "shard": shard, "error": video.error}]
    info, layout = video.info, video.layout
    common = {"fps": fps or info.fps or FALLBACK_FPS, "source_fps": info.fps, "source_size": [info.height, info.width],
              "geometry": dataclasses.asdict(video.geometry), "model_id": tokenizer.model_id,
              "weights_sha256": tokenizer.weights_sha256}
    return [{"source": video.source, "shard": shard, "index": first_index + k, "clip": k, "clips": layout.clips,
             "frames": [start, start + length], "n_frames": length, **common}
            for k, (start, length) in enumerate(zip(layout.starts, layout.lengths))]


def encode_dataset(root: str | Path, out: str | Path, tokenizer: Tokenizer, options: EncodeOptions,
                   dist: distributed.Distributed) -> Summary:
    """Encode this process's share of the shards of the videos under `root` into `out` (see the
    module docstring); the manifest too when every shard is then written."""
    started = time.perf_counter()
    root, out = Path(root), Path(out)
    model = tokenizer.model.eval()
    amp_dtype = autocast_dtype(options, next(model.parameters()).device)
    specs = plan_shards(root, tokenizer, options, "fp32" if amp_dtype is None else "bf16")
    mine = specs[dist.rank::dist.world_size]
    todo = [spec for spec in mine if not is_written(out, spec)]
    found = len(mine) - len(todo)
    todo = todo[:options.max_shards]
    out.mkdir(parents=True, exist_ok=True)

    sources = [source for spec in todo for source in spec.sources]
    loader = DataLoader(VideoFiles(root, sources, model, options.fps, options.limits), batch_size=None,
                        num_workers=options.workers)
    bar = tqdm(total=len(sources), unit="video", dynamic_ncols=True, disable=not (options.progress and dist.is_main),
               desc=f"{len(todo)} shard(s)" + (f" of rank 0 (of {dist.world_size})" if dist.enabled else ""))
    videos: Iterator[DecodedVideo] = iter(loader)
    clips = unreadable = 0
    for spec in todo:
        encoder, rows = ShardEncoder(model, options.batch, amp_dtype), []
        for _ in spec.sources:
            video = next(videos)
            rows += clip_rows(video, spec.index, encoder.added, tokenizer, options.fps)
            if video.error is None:
                encoder.add(video.clips, video.layout.model_n_frames())
            else:
                unreadable += 1
                log.warning("skipping unreadable video %s: %s", root / video.source, video.error)
            bar.set_postfix_str(f"{(clips + encoder.done) / (time.perf_counter() - started):.1f} clips/s", refresh=False)
            bar.update()
        token_shards.write_shard(out, spec, encoder.finish(), rows)
        clips += encoder.added
        bar.set_postfix_str(f"{clips / (time.perf_counter() - started):.1f} clips/s")
    bar.close()
    complete = token_shards.write_manifest(out)
    return Summary(dist.rank, len(specs), len(todo), found, clips, unreadable, time.perf_counter() - started, complete)


def run(root: str | Path, out: str | Path, load: Callable[[torch.device], Tokenizer], options: EncodeOptions) -> Summary:
    """`encode_dataset` in a process torchrun started (or the only one): the model `load`ed on
    this process's device."""
    dist = distributed.setup()
    try:
        return encode_dataset(root, out, load(dist.device), options, dist)
    finally:
        distributed.teardown(dist)
