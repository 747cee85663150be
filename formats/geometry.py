"""How a frame is resized to the model's size, and back: the `Geometry` of a source frame mapped
to an output size under a resize policy (`plan_geometry`; `formats.video` applies it while it
decodes), and its inverse for frames decoded from tokens (`restore_source_size`,
`restored_frames`), which exists unless the frame was cropped. Sizes are (height, width).

The restoring functions call `check_stop()` before each frame; whatever it raises ends the work
(a server's deadline, a client gone).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import av
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

RESIZE_POLICIES = ("crop", "pad", "stretch")


@dataclass(frozen=True)
class Geometry:
    """How a source frame was mapped to the output: output = pad(crop(scale(source))).

    Sizes are (height, width); boxes are (top, left, height, width). `crop` is the window of the
    scaled frame that was kept and `pad` the region of the output that holds it; a step that was
    not applied is the full frame. To go back to the source size, take `output[pad]` (that is
    `scaled[crop]`) and, when `crop` is the full scaled frame, resize it to `source`.
    """

    policy: str
    source: tuple[int, int]
    scaled: tuple[int, int]
    output: tuple[int, int]
    crop: tuple[int, int, int, int]
    pad: tuple[int, int, int, int]


def plan_geometry(source: tuple[int, int], size: tuple[int, int] | None, policy: str = "crop") -> Geometry:
    """Geometry that maps a `source` (H, W) frame to `size` (H, W) under `policy` (`crop`: scale
    so the short side fits and centre-crop; `pad`: scale so the long side fits and pad with black;
    `stretch`: scale to exactly `size`). `size=None` keeps the source size."""
    h, w = source
    out_h, out_w = size if size is not None else source
    if size is None or policy == "stretch":
        scaled = (out_h, out_w)
    elif policy == "crop":
        if h * out_w >= w * out_h:  # relatively taller: the width fits
            scaled = (max(out_h, round(h * out_w / w)), out_w)
        else:
            scaled = (out_h, max(out_w, round(w * out_h / h)))
    elif policy == "pad":
        if h * out_w >= w * out_h:  # relatively taller: the height fits
            scaled = (out_h, min(out_w, max(1, round(w * out_h / h))))
        else:
            scaled = (min(out_h, max(1, round(h * out_w / w))), out_w)
    else:
        raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}, got {policy!r}")
    crop_h, crop_w = min(scaled[0], out_h), min(scaled[1], out_w)
    crop = ((scaled[0] - crop_h) // 2, (scaled[1] - crop_w) // 2, crop_h, crop_w)
    pad = ((out_h - crop_h) // 2, (out_w - crop_w) // 2, crop_h, crop_w)
    return Geometry(policy, (h, w), scaled, (out_h, out_w), crop, pad)


def check_restorable(geometry: Geometry) -> None:
    """ValueError when `geometry` cannot be undone: a crop (the border it removed is gone)."""
    if tuple(geometry.crop) != (0, 0, *geometry.scaled):
        raise ValueError("these frames were cropped from the source (resize=crop): the border is gone, so the "
                         "source size cannot be restored; encode with resize=pad or resize=stretch to keep it")


def restore_source_size(frames: np.ndarray, geometry: Geometry, check_stop: Callable[[], None] | None = None) -> np.ndarray:
    """Undo `geometry` on output frames: uint8 `[T, H, W, 3]` -> `[T, source H, source W, 3]`.

    Padding is removed and the picture scaled back to the source size (see `check_restorable`).
    `check_stop` is called before each frame.
    """
    check_restorable(geometry)
    restored = np.empty((len(frames), *geometry.source, 3), dtype=np.uint8)
    for i, frame in enumerate(restored_frames(frames, geometry, check_stop)):
        restored[i] = frame
    return restored


def restored_frames(frames: np.ndarray, geometry: Geometry,
                    check_stop: Callable[[], None] | None = None) -> Iterator[np.ndarray]:
    """`restore_source_size` one frame at a time: uint8 `[source H, source W, 3]` for each of
    `frames` (checked at the call), so that only one restored frame is held."""
    check_restorable(geometry)
    return _restored(frames, geometry, check_stop)


def _restored(frames: np.ndarray, geometry: Geometry, check_stop: Callable[[], None] | None) -> Iterator[np.ndarray]:
    top, left, height, width = geometry.pad
    source_h, source_w = geometry.source
    reformatter = VideoReformatter()
    for frame in frames[:, top : top + height, left : left + width]:
        if check_stop is not None:
            check_stop()
        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        yield reformatter.reformat(picture, width=source_w, height=source_h, format="rgb24",
                                   interpolation=Interpolation.BICUBIC).to_ndarray()
