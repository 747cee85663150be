"""Video files out, with PyAV: the output formats (`OUTPUT_FORMATS`: mp4 as H.264, webm as VP9,
npy as the raw uint8 array) and a whole video encoded in one call (`write_video`, `video_bytes`).
`formats.video_stream` writes the same formats clip by clip, with this module's encoders.

`write_video` and `video_bytes` call `check_stop()` before each frame; whatever it raises ends the
work (a server's deadline, a client gone).
"""
from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from coordtok.formats.video import Source, check_fps


@dataclass(frozen=True)
class VideoFormat:
    """A format decoded frames are written in: its media type and the `write_video` codec (None:
    the uint8 frames as an .npy array)."""

    media_type: str
    codec: str | None


# The one table of output formats, by name (the file extension, and FFmpeg's muxer for a video codec).
OUTPUT_FORMATS = {
    "mp4": VideoFormat("video/mp4", "h264"),
    "webm": VideoFormat("video/webm", "vp9"),
    "npy": VideoFormat("application/x-npy", None),
}
# Media types by file extension: the output formats' and those of other containers uploads come in.
UPLOAD_TYPES = {
    **{name: f.media_type for name, f in OUTPUT_FORMATS.items() if f.codec is not None},
    "avi": "video/x-msvideo", "mkv": "video/x-matroska", "mov": "video/quicktime",
}
# write_video's codecs: the FFmpeg encoder and encoder options of each.
_ENCODERS = {
    "h264": ("libx264", {"crf": "18"}),
    "vp9": ("libvpx-vp9", {"crf": "32", "b": "0", "deadline": "good", "cpu-used": "4"}),
}


def write_video(frames: np.ndarray, path_or_file: Source, fps: float, codec: str = "h264",
                check_stop: Callable[[], None] | None = None) -> None:
    """Encode RGB uint8 `[T, H, W, 3]` frames at `fps` (in [MIN_FPS, MAX_FPS]) as MP4/H.264
    (`codec="h264"`, libx264, yuv420p, CRF 18) or WebM/VP9 (`codec="vp9"`, libvpx-vp9, yuv420p,
    CRF 32). The same frames give the same bytes (the muxers write no random ids nor versions).

    H.264 in yuv420p needs even sizes: an odd height or width is padded by repeating the last row
    or column, so the decoded video is one pixel larger there (VP9 keeps odd sizes). An MP4 written
    to a path has its index at the front (faststart) for progressive playback; to a file object it
    is at the end. `check_stop` is called before each frame. (`formats.video_stream` writes a file
    clip by clip instead.)
    """
    if codec not in _ENCODERS:
        raise ValueError(f"codec must be one of {tuple(_ENCODERS)}, got {codec!r}")
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [T>0, H, W, 3], got {frames.dtype} {frames.shape}")
    check_fps(fps, "the output rate")
    is_path = isinstance(path_or_file, (str, os.PathLike))
    options = {"fflags": "+bitexact", **({"movflags": "faststart"} if codec == "h264" and is_path else {})}
    with av.open(path_or_file, mode="w", format=container_format(codec), options=options) as container:
        stream = add_video_stream(container, codec, fps, frames.shape[1:3])
        for image in frames:
            if check_stop is not None:
                check_stop()
            container.mux(stream.encode(video_frame(image, stream)))
        container.mux(stream.encode(None))


def container_format(codec: str) -> str:
    """The output format (FFmpeg's muxer) that holds `codec`."""
    return next(name for name, f in OUTPUT_FORMATS.items() if f.codec == codec)


def add_video_stream(container: av.container.OutputContainer, codec: str, fps: float, size: tuple[int, int],
                     options: dict[str, str] | None = None) -> av.video.stream.VideoStream:
    """Add a `codec` encoder (`_ENCODERS`, its options updated by `options`) for frames of `size`
    (H, W) at `fps` to an output container. H.264 in yuv420p takes even sizes only: an odd side is
    one pixel larger in the stream (`video_frame` pads the frames)."""
    encoder, encoder_options = _ENCODERS[codec]
    stream = container.add_stream(encoder, rate=Fraction(fps).limit_denominator(1001),
                                  options={**encoder_options, **(options or {})})
    height, width = size
    if codec == "h264":
        height, width = height + height % 2, width + width % 2
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    return stream


def video_frame(image: np.ndarray, stream: av.video.stream.VideoStream) -> av.VideoFrame:
    """RGB uint8 `[H, W, 3]` as a frame for `stream`, padded to the stream's size by repeating the
    last row and column (`add_video_stream`)."""
    pad_h, pad_w = stream.height - image.shape[0], stream.width - image.shape[1]
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return av.VideoFrame.from_ndarray(image, format="rgb24")


def video_bytes(frames: np.ndarray, fps: float, fmt: str, check_stop: Callable[[], None] | None = None) -> bytes:
    """uint8 `[T, H, W, 3]` frames as a file of output format `fmt` (see OUTPUT_FORMATS) at `fps`."""
    buffer = io.BytesIO()
    codec = OUTPUT_FORMATS[fmt].codec
    if codec is None:
        np.save(buffer, frames, allow_pickle=False)
    else:
        write_video(frames, buffer, fps, codec=codec, check_stop=check_stop)
    return buffer.getvalue()
