"""Video files in, with PyAV: probe, decode to RGB, resize (`formats.geometry`), select a time
range or frame rate. Files out: `formats.video_write` (whole) and `formats.video_stream` (clip by clip).

Shared by the trainer and the server, so both see the same pixels. Every input is bounded by a
`MediaLimits`: the container/stream header is checked before decoding (`probe`), and the same limits
are enforced again on every decoded frame, so a file whose header lies is still stopped.

Errors form one hierarchy under `MediaError` (what each means to a client: service/errors.py):

- `UnsupportedMedia`: not a video container, audio only, or a codec FFmpeg cannot decode.
- `CorruptMedia`: an empty or truncated file, a container without a readable stream, or a stream
  that fails to decode.
- `MediaTooLarge`: the header or the decoded frames exceed the limits (`TooManyFrames`: a request's
  own frame limit).

A still image FFmpeg reads (PNG, JPEG, ...) is a video of one frame; a PNG's size is checked from
its header before FFmpeg sees it.

Long work can be stopped: `read_frames` and `iter_frames` call `check_stop()` before each frame,
and whatever it raises ends the work (a server's deadline, a client gone).

Missing files and permission errors are not media errors and propagate unchanged (FFmpeg's I/O
errors on a damaged file are media errors).
A file cut short can decode without any error, and then the frames before the cut are returned:
FFmpeg's Matroska demuxer just stops wherever the cut is, and its MP4 demuxer stops when the cut
falls exactly between two frames (a cut inside a frame's data fails to decode).

Conventions:
- Time is in seconds from the start of the video stream (its first timestamp is 0).
- Frames come out as RGB uint8 `[H, W, 3]` in full range; sample aspect ratio and rotation metadata
  are not applied (pixels are taken as stored).
- With `fps` given, output frame `k` is the source frame whose timestamp is nearest to `k / fps`
  (ties go to the earlier frame), so frames may repeat or drop and any time range selects the same
  frames as a full decode would.
"""
from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO, Union

import av
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

from coordtok.formats.geometry import RESIZE_POLICIES, Geometry, plan_geometry

Source = Union[str, os.PathLike, BinaryIO]

# FFmpeg's own assumption for streams that declare no frame rate.
FALLBACK_FPS = 25.0
# Frame rates a video is read at or written with (a source, a resampling rate, an output rate).
MIN_FPS, MAX_FPS = 0.1, 1000.0
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Slack for float comparisons of times, on top of half the stream's time base.
_TIME_EPS = 1e-6


class MediaError(Exception):
    """Base of every error about the media itself."""


class UnsupportedMedia(MediaError):
    """Not a video container, no video stream, or a codec this build of FFmpeg cannot decode."""


class CorruptMedia(MediaError):
    """A recognised container that is empty, truncated or fails to decode."""


class MediaTooLarge(MediaError):
    """The video exceeds a `MediaLimits` bound (read from the header or met while decoding)."""


class TooManyFrames(MediaTooLarge):
    """A video yields more frames than `frame_limit`: `frames` is the header's count, or None when
    the limit was crossed while decoding (a header that lies or does not tell)."""

    def __init__(self, frames: int | None, limit: int) -> None:
        said = f"{frames} frames according to its header" if frames is not None else "more frames than its header says"
        super().__init__(f"the video yields {said}, over the limit of {limit}")
        self.frames, self.limit = frames, limit


@dataclass(frozen=True)
class MediaLimits:
    """Bounds on what is decoded: frame size, pixels per frame, duration, decoded frame count and
    the streams of the file (FFmpeg probes each stream when it opens a file)."""

    max_width: int = 4096
    max_height: int = 4096
    max_pixels: int = 4096 * 2304
    max_duration_s: float = 600.0
    max_frames: int = 20000
    max_streams: int = 8


@dataclass(frozen=True)
class VideoInfo:
    """What the header says about the first video stream. `fps` is 0.0, and `frames` and
    `duration_s` are 0, when the header does not tell (`frames` is estimated from duration * fps
    when the container has no frame count)."""

    width: int
    height: int
    fps: float
    frames: int
    duration_s: float
    codec: str
    pix_fmt: str

    def frames_at(self, fps: float | None = None) -> int:
        """Expected number of frames `read_frames` returns for the whole video at `fps` (the
        source rate when None): the grid points `k / fps` before the end. 0 when unknown."""
        if fps is None or (self.fps > 0 and math.isclose(fps, self.fps)):
            return self.frames
        return max(math.ceil(self.duration_s * fps - 1e-6), 0)


# --------------------------------------------------------------------------------------------
# Opening and probing


def probe(source: Source, limits: MediaLimits = MediaLimits()) -> VideoInfo:
    """Read the header of `source` (a path or a seekable binary file) and check it against
    `limits`. Raises `UnsupportedMedia`, `CorruptMedia` or `MediaTooLarge`."""
    with _opened(source, limits) as (_, _, info):
        return info


def check_fps(fps: float, what: str) -> float:
    """`fps` if it lies in [MIN_FPS, MAX_FPS], else ValueError naming `what`."""
    if not MIN_FPS <= fps <= MAX_FPS:  # NaN fails too
        raise ValueError(f"{what} is {fps:g} fps; frame rates from {MIN_FPS:g} to {MAX_FPS:g} are supported")
    return fps


def _head(source: Source, n: int = 512) -> bytes:
    """The first `n` bytes of `source`; a file object is rewound to its start afterwards."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return f.read(n)
    source.seek(0)
    head = source.read(n)
    source.seek(0)
    return head


def _looks_like_container(head: bytes) -> bool:
    """Whether `head` starts like a video container FFmpeg knows (ISO-BMFF/MP4/MOV, Matroska/WebM,
    AVI, Ogg, FLV, ASF, MPEG-PS or MPEG-TS); used to tell a damaged video from a non-video."""
    return (
        head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")
        or head.startswith((b"\x1a\x45\xdf\xa3", b"OggS", b"FLV", b"\x30\x26\xb2\x75", b"\x00\x00\x01\xba"))
        or (head.startswith(b"RIFF") and head[8:12] == b"AVI ")
        or (len(head) > 188 and head[0] == head[188] == 0x47)
    )


def _open_container(source: Source, limits: MediaLimits) -> av.container.InputContainer:
    """av.open with FFmpeg's errors mapped to `MediaError`s. FFmpeg creates at most one stream
    more than `limits.max_streams` (so that a file with too many is told apart, unprobed)."""
    head = _head(source)
    if not head:
        raise CorruptMedia("the file is empty (0 bytes); the upload or copy was probably interrupted")
    if head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":  # FFmpeg refuses huge images as "invalid data"
        width, height = struct.unpack(">II", head[16:24])
        _check_size(width, height, limits, "the PNG header says its")
    try:
        return av.open(source, mode="r", container_options={"max_streams": str(limits.max_streams + 1)},
                       metadata_errors="replace")
    except av.error.FFmpegError as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):  # not a media problem
            raise
        if _looks_like_container(head):
            raise CorruptMedia(
                f"the container header cannot be read ({e.strerror}): a truncated file, or an MP4 "
                "whose index was never written? Re-export or re-upload the complete file"
            ) from e
        raise UnsupportedMedia("not a video file FFmpeg recognises; upload MP4, WebM, MKV, MOV or AVI") from e


def _stream_info(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> VideoInfo:
    """VideoInfo of `stream` from the container and stream headers."""
    ctx = stream.codec_context
    rate = stream.guessed_rate or stream.average_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    frames = stream.frames or (round(duration * fps) if fps > 0 else 0)
    return VideoInfo(
        width=ctx.width, height=ctx.height, fps=fps, frames=frames, duration_s=duration,
        codec=ctx.name, pix_fmt=ctx.pix_fmt or "unknown",
    )


def _check_size(width: int, height: int, limits: MediaLimits, where: str) -> None:
    if width > limits.max_width or height > limits.max_height or width * height > limits.max_pixels:
        raise MediaTooLarge(
            f"{where} frames are {width}x{height}, over the limit of {limits.max_width}x{limits.max_height} "
            f"and {limits.max_pixels} pixels; downscale the video (e.g. ffmpeg -vf scale=-2:720)"
        )


def _reach_s(info: VideoInfo, fps: float | None, start_s: float, end_s: float | None, max_frames: int | None) -> float:
    """How far into the video, in seconds, a read goes by the header: to its end, or to `end_s`,
    or to where `max_frames` output frames from `start_s` run out, whichever comes first
    (decoding stops there). 0.0 when the header gives no duration."""
    reach = info.duration_s if end_s is None else min(info.duration_s, end_s)
    rate = fps or info.fps
    if max_frames is not None and rate > 0:
        reach = min(reach, start_s + max_frames / rate)
    return reach


def _check_header(info: VideoInfo, limits: MediaLimits, reach_s: float) -> None:
    """Raise `MediaTooLarge` when the header already says that the part read, up to `reach_s`
    (`_reach_s`), exceeds `limits`."""
    _check_size(info.width, info.height, limits, "the header says")
    whole = reach_s >= info.duration_s
    if reach_s > limits.max_duration_s:
        read = f"the video lasts {info.duration_s:.1f} s" if whole else f"the part asked for ends at {reach_s:.1f} s"
        raise MediaTooLarge(
            f"{read}, over the limit of {limits.max_duration_s:g} s; cut it into shorter parts or "
            f"ask for a part that ends by {limits.max_duration_s:g} s"
        )
    frames = info.frames if whole else math.ceil(info.frames * reach_s / info.duration_s)
    if frames > limits.max_frames:
        read = f"the video has {frames} frames" if whole else f"the part asked for holds about {frames} frames"
        raise MediaTooLarge(
            f"{read}, over the limit of {limits.max_frames}; cut it into shorter parts or lower its frame rate"
        )


@contextmanager
def _opened(source: Source, limits: MediaLimits, fps: float | None = None, start_s: float = 0.0,
            end_s: float | None = None, max_frames: int | None = None):
    """Open `source`, pick its first video stream and check the header against `limits` for the
    part read (`read_frames`' fps, start_s, end_s and max_frames; by default the whole video):
    yields (container, stream, info) and closes the container afterwards."""
    container = _open_container(source, limits)
    try:
        if len(container.streams) > limits.max_streams:
            raise MediaTooLarge(f"the file holds more than {limits.max_streams} streams (video, audio, subtitles, ...), "
                                f"over the limit of {limits.max_streams}; keep only the video (e.g. ffmpeg -map 0:v:0)")
        if not container.streams.video:
            if any(stream.type not in ("audio", "subtitle", "attachment") for stream in container.streams):
                raise CorruptMedia("the container lists a stream that is not a readable video: the video stream "
                                   "is damaged; re-export or re-upload the file")
            if container.streams.audio:
                raise UnsupportedMedia("the file has only audio; upload a file that contains video")
            raise CorruptMedia("the file has no readable video stream: a truncated or damaged file?")
        stream = container.streams.video[0]
        if stream.codec_context is None or not stream.codec_context.name:
            raise UnsupportedMedia("the video codec is unknown to FFmpeg (a damaged video stream, or a codec this "
                                   "build cannot decode); re-encode it as H.264")
        info = _stream_info(container, stream)
        _check_header(info, limits, _reach_s(info, fps, start_s, end_s, max_frames))
        yield container, stream, info
    finally:
        container.close()


# --------------------------------------------------------------------------------------------
# Decoding


def _timed_frames(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    info: VideoInfo,
    limits: MediaLimits,
    seek_s: float,
) -> Iterator[tuple[float, av.VideoFrame]]:
    """Decode `stream` from the last keyframe at or before `seek_s`, yielding (time in seconds
    from the stream start, frame) and enforcing `limits` on every frame. A frame without a
    timestamp is placed one frame period (1 / fps) after the previous one."""
    time_base = stream.time_base or Fraction(1, av.time_base)
    origin = float(stream.start_time * time_base) if stream.start_time is not None else 0.0
    period = 1.0 / (info.fps or FALLBACK_FPS)
    if seek_s > 0:
        try:
            container.seek(int((origin + seek_s) / time_base), stream=stream, backward=True)
        except (av.error.FFmpegError, OverflowError):  # OverflowError: a start past any timestamp
            pass  # not seekable: decode from the start; frames before the range are skipped
    previous = None
    decoded = 0
    try:
        for frame in container.decode(stream):
            decoded += 1
            if frame.time is not None:
                t = frame.time - origin
            else:
                t = previous + period if previous is not None else max(seek_s, 0.0)
            previous = t
            _check_size(frame.width, frame.height, limits, "decoded")
            if decoded > limits.max_frames:
                raise MediaTooLarge(
                    f"the video has more than {limits.max_frames} frames (more than its header "
                    "declares); cut it into shorter parts"
                )
            if t > limits.max_duration_s:
                raise MediaTooLarge(
                    f"the video runs past {limits.max_duration_s:g} s (longer than its header "
                    "declares); cut it into shorter parts"
                )
            yield t, frame
    except av.error.DecoderNotFoundError as e:
        raise UnsupportedMedia(f"no decoder for the {info.codec} codec; re-encode it as H.264") from e
    except av.error.FFmpegError as e:
        raise CorruptMedia(
            f"decoding failed after {decoded} frames ({e.strerror}); the file is truncated or damaged"
        ) from e
    if decoded == 0:
        raise CorruptMedia("no frame could be decoded; the file is truncated or damaged")


def _in_range(
    timed: Iterator[tuple[float, av.VideoFrame]], start_s: float, end_s: float, tol: float
) -> Iterator[av.VideoFrame]:
    """The source frames whose time lies in [start_s, end_s) (within `tol`)."""
    for t, frame in timed:
        if t >= end_s - tol:
            return
        if t >= start_s - tol:
            yield frame


def _resampled(
    timed: Iterator[tuple[float, av.VideoFrame]], fps: float, start_s: float, end_s: float, period: float, tol: float
) -> Iterator[av.VideoFrame]:
    """For every grid time `k / fps` in [start_s, end_s), the source frame nearest to it (ties
    to the earlier frame). The last source frame is shown for `period` seconds (within `tol`)."""
    k = math.ceil(start_s * fps - _TIME_EPS)
    previous = None
    for t, frame in timed:
        while k / fps <= t and k / fps < end_s - _TIME_EPS:
            target = k / fps
            near_previous = previous is not None and target - previous[0] <= t - target
            yield previous[1] if near_previous else frame
            k += 1
        if k / fps >= end_s - _TIME_EPS:
            return
        previous = (t, frame)
    if previous is not None:
        stop = min(end_s - _TIME_EPS, previous[0] + period - tol)
        while k / fps < stop:
            yield previous[1]
            k += 1


class _Scaler:
    """Converts decoded frames to RGB uint8 `[H, W, 3]` of one output size (the requested `size`,
    else the first frame's size), reusing one swscale context."""

    def __init__(self, size: tuple[int, int] | None, policy: str):
        self.size = size
        self.policy = policy
        self.geometry: Geometry | None = None  # of the first frame
        self._plans: dict[tuple[int, int], Geometry] = {}
        self._reformatter = VideoReformatter()

    def _plan(self, source: tuple[int, int]) -> Geometry:
        if self.size is None:
            self.size = source
        if source not in self._plans:
            self._plans[source] = plan_geometry(source, self.size, self.policy)
        return self._plans[source]

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        g = self._plan((frame.height, frame.width))
        if self.geometry is None:
            self.geometry = g
        downscale = g.scaled[0] <= g.source[0] and g.scaled[1] <= g.source[1]
        rgb = self._reformatter.reformat(
            frame, width=g.scaled[1], height=g.scaled[0], format="rgb24",
            interpolation=Interpolation.AREA if downscale else Interpolation.BICUBIC,
            src_color_range=frame.color_range,
        ).to_ndarray()
        top, left, h, w = g.crop
        if g.pad == (0, 0, *g.output):
            return np.ascontiguousarray(rgb[top:top + h, left:left + w])
        out = np.zeros((*g.output, 3), np.uint8)
        ptop, pleft, _, _ = g.pad
        out[ptop:ptop + h, pleft:pleft + w] = rgb[top:top + h, left:left + w]
        return out


def _check_request(size, resize, fps, start_s, end_s, max_frames) -> None:
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (height, width) with positive entries, got {size!r}")
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}")
    if fps is not None:
        check_fps(fps, "the requested rate")
    if not math.isfinite(start_s) or start_s < 0 or (end_s is not None and end_s <= start_s):
        raise ValueError(f"need 0 <= start_s < end_s, got start_s={start_s!r}, end_s={end_s!r}")
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0, got {max_frames!r}")


def _frames(container, stream, info, limits, scaler, fps, start_s, end_s, max_frames,
            frame_limit=None, check_stop=None) -> Iterator[np.ndarray]:
    """The selected frames of an opened stream as RGB uint8 `[H, W, 3]` arrays (see read_frames)."""
    if fps is None and info.fps > 0 and not MIN_FPS <= info.fps <= MAX_FPS:
        raise UnsupportedMedia(f"the video is {info.fps:g} fps; frame rates from {MIN_FPS:g} to {MAX_FPS:g} are "
                               "supported: pass fps to resample it")
    period = 1.0 / (info.fps or FALLBACK_FPS)
    end = math.inf if end_s is None else end_s
    # Seek one source frame early so that the frame nearest to the first grid time is decoded.
    timed = _timed_frames(container, stream, info, limits, seek_s=start_s - period if fps else start_s)
    # Timestamps are rounded to the stream's time base (milliseconds in Matroska).
    tol = 0.5 * float(stream.time_base or 0) + _TIME_EPS
    if fps is None:
        selected = _in_range(timed, start_s, end, tol)
    else:
        selected = _resampled(timed, fps, start_s, end, period, tol)
    for count, frame in enumerate(selected):
        if max_frames is not None and count >= max_frames:
            return
        if count >= limits.max_frames:
            raise MediaTooLarge(
                f"the video yields more than {limits.max_frames} frames; ask for a lower fps or a shorter range"
            )
        if frame_limit is not None and count >= frame_limit:
            raise TooManyFrames(None, frame_limit)
        if check_stop is not None:
            check_stop()
        yield scaler(frame)


def iter_frames(
    source: Source,
    limits: MediaLimits = MediaLimits(),
    size: tuple[int, int] | None = None,
    resize: str = "crop",
    fps: float | None = None,
    start_s: float = 0.0,
    end_s: float | None = None,
    max_frames: int | None = None,
    check_stop: Callable[[], None] | None = None,
) -> Iterator[np.ndarray]:
    """Decode `source` one RGB uint8 `[H, W, 3]` frame at a time; arguments as in `read_frames`.
    Arguments are checked at the call; the file is opened at the first frame and stays open until
    the generator is exhausted or closed."""
    _check_request(size, resize, fps, start_s, end_s, max_frames)
    return _iter_frames(source, limits, _Scaler(size, resize), fps, start_s, end_s, max_frames, check_stop)


def _iter_frames(source, limits, scaler, fps, start_s, end_s, max_frames, check_stop) -> Iterator[np.ndarray]:
    with _opened(source, limits, fps, start_s, end_s, max_frames) as (container, stream, info):
        yield from _frames(container, stream, info, limits, scaler, fps, start_s, end_s, max_frames,
                           check_stop=check_stop)


def read_frames(
    source: Source,
    limits: MediaLimits = MediaLimits(),
    size: tuple[int, int] | None = None,
    resize: str = "crop",
    fps: float | None = None,
    start_s: float = 0.0,
    end_s: float | None = None,
    max_frames: int | None = None,
    frame_limit: int | None = None,
    check_stop: Callable[[], None] | None = None,
) -> tuple[np.ndarray, VideoInfo, Geometry]:
    """Decode `source` (a path or a seekable binary file) to RGB uint8 `[T, H, W, 3]`.

    size: output (H, W), mapped with the `resize` policy (`crop`, `pad` or `stretch`, see
        `plan_geometry`); None keeps the source size.
    fps: resample to this rate by timestamp (nearest frame); None keeps the source frames.
    start_s, end_s: the time range [start_s, end_s) in seconds (seeks when start_s > 0).
    max_frames: stop after this many output frames.
    limits: checked against the part read (the header's duration and frame count up to where
        `end_s` or `max_frames` stop the decoding), then on every decoded frame.
    frame_limit: refuse (`TooManyFrames`) a request that yields more output frames: from the
        header's frame count before anything is decoded, else at the frame that crosses it.
    check_stop: called before each output frame; what it raises ends the decoding.

    Returns the frames, the header's `VideoInfo` and the `Geometry` applied to the first frame.
    T may be 0 when the range lies past the end. Raises `UnsupportedMedia`, `CorruptMedia` or
    `MediaTooLarge`.
    """
    _check_request(size, resize, fps, start_s, end_s, max_frames)
    scaler = _Scaler(size, resize)
    with _opened(source, limits, fps, start_s, end_s, max_frames) as (container, stream, info):
        if frame_limit is not None and (declared := _declared_count(info, fps, start_s, end_s)) > frame_limit:
            raise TooManyFrames(declared, frame_limit)
        expected = _expected_count(info, fps, start_s, end_s, max_frames, limits)
        frames = _collect(_frames(container, stream, info, limits, scaler, fps, start_s, end_s, max_frames,
                                  frame_limit, check_stop), expected)
    if frames is None:  # nothing in the range: describe what a frame would have become
        geometry = plan_geometry((info.height, info.width), size, resize)
        return np.empty((0, *geometry.output, 3), np.uint8), info, geometry
    return frames, info, scaler.geometry


def _declared_count(info: VideoInfo, fps: float | None, start_s: float, end_s: float | None) -> int:
    """The output frames the header promises for a request (0 when it does not tell): the
    header's frame count for the whole video at its own rate, else the range's duration x rate."""
    if start_s == 0 and end_s is None and info.frames_at(fps):
        return info.frames_at(fps)
    rate = fps or info.fps
    end = info.duration_s if end_s is None else min(end_s, info.duration_s)
    return math.floor(max(end - start_s, 0.0) * rate + 1e-6) if rate > 0 and info.duration_s > 0 else 0


def _expected_count(info, fps, start_s, end_s, max_frames, limits) -> int:
    """How many frames a request should yield according to the header (a buffer size hint)."""
    rate = fps or info.fps or FALLBACK_FPS
    end = info.duration_s if end_s is None else min(end_s, info.duration_s or end_s)
    estimate = max(math.ceil(min(max(end - start_s, 0.0) * rate, limits.max_frames)), 1)
    return min(estimate, max_frames if max_frames is not None else estimate, limits.max_frames)


def _collect(frames: Iterator[np.ndarray], expected: int) -> np.ndarray | None:
    """Stack same-sized `[H, W, 3]` frames into one `[T, H, W, 3]` buffer without holding them
    twice: it is sized from the header's estimate at the first frame and doubles when the header
    under-counts (pages never written cost no memory). None when there is no frame."""
    buffer = None
    n = 0
    for frame in frames:
        if n == 0:
            buffer = np.empty((max(expected, 1), *frame.shape), np.uint8)
        elif n == len(buffer):
            grown = np.empty((2 * len(buffer), *buffer.shape[1:]), np.uint8)
            grown[:n] = buffer
            buffer = grown
        buffer[n] = frame
        n += 1
    return None if buffer is None else buffer[:n]
