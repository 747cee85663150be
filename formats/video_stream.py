"""A video file written as it is made: frames go in clip by clip and the file's bytes come out as
the container writes them, so the writer never holds the whole video.

    writer = StreamWriter("mp4", fps=24.0, frames=256, size=(128, 128))
    for clip in clips:                       # uint8 [H, W, 3] frames, 256 in all
        for chunk in writer.encode(clip):    # the bytes the file grew by
            send(chunk)
    send(writer.finish())

The formats are those of `formats.video_write.OUTPUT_FORMATS`, with `write_video`'s codecs and options:

- mp4: fragmented MP4 (movflags `frag_keyframe+empty_moov+default_base_moof`): an index without
  samples first, then one fragment per keyframe. Each `encode` call starts with a keyframe, so each
  clip is a fragment; it leaves once the encoder's lookahead (up to 40 frames for libx264) has
  passed it and the next keyframe arrives.
- webm: Matroska written front to back without seeking: the header gives no duration and the file
  has no index (cues); FFmpeg and browsers play it as a live stream.
- npy: the .npy header first (the shape comes from `frames` and `size`), then each frame's bytes:
  the file `np.save` writes for the whole video, and its size (`content_length`) is known ahead.

What a writer holds: the encoder's lookahead frames, the fragment or cluster being built and the
bytes it has not handed out yet (at most `chunk_bytes` plus one frame's, or one fragment).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import av
import numpy as np
from av.video.frame import PictureType

from coordtok.formats.video import check_fps
from coordtok.formats.video_write import OUTPUT_FORMATS, add_video_stream, video_frame

# Muxer options that let each format be written front to back, handing out bytes as it goes.
_STREAMING_OPTIONS = {"mp4": {"movflags": "frag_keyframe+empty_moov+default_base_moof"}}
# Encoder options that make a frame marked as an I frame a keyframe that starts a new fragment.
_KEYFRAME_OPTIONS = {"h264": {"forced-idr": "1"}}


class _Sink:
    """A write-only file (no seek, so FFmpeg writes the container front to back) that keeps what
    is written until it is taken."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0

    def write(self, data) -> int:
        data = bytes(data)
        self._parts.append(data)
        self.size += len(data)
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        self.size = 0
        return data


class StreamWriter:
    """One file of output format `fmt` with `frames` frames of `size` (H, W) at `fps`, written as
    frames arrive. Use it as a context manager (or call `close`) so that an abandoned file releases
    its encoder."""

    def __init__(self, fmt: str, fps: float, frames: int, size: tuple[int, int], chunk_bytes: int = 1 << 20) -> None:
        if fmt not in OUTPUT_FORMATS:
            raise ValueError(f"format must be one of {tuple(OUTPUT_FORMATS)}, got {fmt!r}")
        if frames < 1 or len(size) != 2 or min(size) < 1:
            raise ValueError(f"need frames >= 1 and a (height, width) size, got frames={frames}, size={size!r}")
        check_fps(fps, "the output rate")
        self.frames, self.size, self.chunk_bytes = frames, (int(size[0]), int(size[1])), chunk_bytes
        self.written = 0
        self._sink = _Sink()
        self._container = self._stream = None
        codec = OUTPUT_FORMATS[fmt].codec
        if codec is None:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": (frames, *self.size, 3)}
            np.lib.format.write_array_header_1_0(self._sink, header)
            self.content_length: int | None = self._sink.size + frames * self.size[0] * self.size[1] * 3
        else:
            self._container = av.open(self._sink, mode="w", format=fmt,
                                      options={"fflags": "+bitexact", **_STREAMING_OPTIONS.get(fmt, {})})
            self._stream = add_video_stream(self._container, codec, fps, self.size, _KEYFRAME_OPTIONS.get(codec))
            self.content_length = None

    def encode(self, frames: Iterable[np.ndarray], check_stop: Callable[[], None] | None = None) -> Iterator[bytes]:
        """Write uint8 `[H, W, 3]` frames (a clip, or frames made one at a time) and yield the bytes
        the file grows by, whenever `chunk_bytes` have gathered and at the end. Nothing is written
        until the iterator is consumed. A video's first frame of each call is a keyframe.
        `check_stop` is called before each frame."""
        for i, image in enumerate(frames):
            if check_stop is not None:
                check_stop()
            self._check(image)
            if self._container is None:
                self._sink.write(np.ascontiguousarray(image).data)
            else:
                frame = video_frame(image, self._stream)
                if i == 0:
                    frame.pict_type = PictureType.I
                self._container.mux(self._stream.encode(frame))
            self.written += 1
            if self._sink.size >= self.chunk_bytes:
                yield self._sink.take()
        if self._sink.size:
            yield self._sink.take()

    def finish(self) -> bytes:
        """Flush the encoder and end the file; returns its last bytes. ValueError when fewer frames
        than announced were written (the file would not match its header)."""
        if self.written != self.frames:
            raise ValueError(f"{self.written} frames were written, {self.frames} announced")
        if self._container is not None:
            self._container.mux(self._stream.encode(None))
            self.close()
        return self._sink.take()

    def close(self) -> None:
        """Release the encoder (the file stays unfinished unless `finish` was called)."""
        if self._container is not None:
            container, self._container = self._container, None
            container.close()

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check(self, image: np.ndarray) -> None:
        if image.dtype != np.uint8 or image.shape != (*self.size, 3):
            raise ValueError(f"frames must be uint8 {[*self.size, 3]}, got {image.dtype} {list(image.shape)}")
        if self.written >= self.frames:
            raise ValueError(f"more frames than the {self.frames} announced")
