"""Video <-> tokens: POST /v1/encode, /v1/decode and /v1/preview.

encode: upload (bounded, spooled to disk) -> media.read_frames off the event loop -> clips of the
model's frame count (the last padded, its frame count kept) -> engine -> token file.
decode: token file (bounded, validated) -> engine, clip by clip (only the requested frames) -> mp4 /
webm / npy streamed as the clips are written (service/streaming.py).
A request takes its place in the engine's queue once its body has arrived (a slow body holds none);
its media work runs under the request's deadline and stops when its client goes away.
"""
from __future__ import annotations

import math
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, NamedTuple

import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from coordtok.formats import tokens
from coordtok.formats import video as media
from coordtok.formats.geometry import Geometry, check_restorable
from coordtok.formats.video_write import video_bytes
from coordtok.formats.video_stream import StreamWriter
from coordtok.model.clips import ClipLayout, policy_for
from coordtok.service import uploads
from coordtok.service.clock import RequestClock, unless_disconnected
from coordtok.service.errors import RequestError
from coordtok.service.routes.deps import RuntimeDep
from coordtok.service.routes.spec import (BINARY, DECODE_BODY, ENCODE_BODY, JSON, TOKEN_FORMAT, UPLOAD_REFUSALS,
                                          VIDEO_FORMAT, VIDEO_TYPES, answers)
from coordtok.service.runtime import Runtime
from coordtok.service.streaming import DecodeStream

router = APIRouter()


class VideoReading(NamedTuple):
    """The query that says how an uploaded video is read (`media.read_frames`' resize, fps,
    start_s and end_s, in that order)."""

    resize: str
    fps: float | None
    start: float
    end: float | None


def video_reading(
    runtime: RuntimeDep,
    resize: str = Query("crop", pattern="^(crop|pad|stretch)$"),
    fps: float | None = Query(None, ge=media.MIN_FPS, le=media.MAX_FPS, allow_inf_nan=False,
                              description="resample to this rate (default: the source's)"),
    start: float = Query(0.0, ge=0, allow_inf_nan=False, description="seconds (at most COORDTOK_MAX_DURATION_S)"),
    end: float | None = Query(None, gt=0, allow_inf_nan=False, description="seconds"),
) -> VideoReading:
    """How /v1/encode and /v1/preview read an uploaded video (their shared query)."""
    if start > runtime.settings.max_duration_s:
        raise RequestError(f"start ({start:g} s) lies past this server's longest video, "
                           f"{runtime.settings.max_duration_s:g} s")
    if end is not None and end <= start:
        raise RequestError(f"end ({end:g} s) must come after start ({start:g} s)")
    return VideoReading(resize, fps, start, end)


Reading = Annotated[VideoReading, Depends(video_reading)]


@router.post("/v1/encode", openapi_extra=ENCODE_BODY, response_class=Response,
             responses=answers(*UPLOAD_REFUSALS, ok={200: {**{mime: BINARY for mime in tokens.FORMATS.values()}, **JSON}}))
async def encode(request: Request, runtime: RuntimeDep, reading: Reading,
                 format: str | None = Query(None, pattern=TOKEN_FORMAT)) -> Response:
    settings, metrics, config = runtime.settings, runtime.metrics, runtime.config
    fmt = format or _format_from_accept(request.headers.get("accept", ""))
    upload = (await uploads.save_upload(request, settings.upload_dir)).path  # before taking a place
    clock = RequestClock(settings.request_timeout_s)
    with removed_afterwards(upload), runtime.engine.admit():
        metrics.body_bytes.labels("/v1/encode").observe(upload.stat().st_size)
        try:
            began = time.perf_counter()
            frames, info, geometry = await clock.run(
                request, metrics, "/v1/encode", media.read_frames, upload, settings.media_limits(),
                (config.height, config.width), *reading, frame_limit=settings.max_clips * config.frames)
            metrics.phase.labels("/v1/encode", "media_decode").observe(time.perf_counter() - began)
        except media.TooManyFrames as error:
            raise RequestError(_too_many_clips(error, config.frames, settings.max_clips), 413) from None
        finally:
            upload.unlink(missing_ok=True)
        if len(frames) == 0:
            raise RequestError("the video has no frames in the requested time range")
        layout = ClipLayout.plan(len(frames), config.frames, policy_for(config.reference_compat))
        if layout.clips > settings.max_clips:
            raise RequestError(f"the video makes {layout.clips} clips of {config.frames} frames; at most "
                               f"{settings.max_clips} per request: send a shorter range (start/end)", 413)
        clips = layout.cut(torch.from_numpy(frames))
        metrics.input_frames.labels("/v1/encode").inc(len(frames))
        began = time.perf_counter()
        encoding = clock.within(runtime.engine.encode(clips, layout.model_n_frames()))  # one deadline for the request
        triplane = await unless_disconnected(request, encoding, metrics, "/v1/encode")
        metrics.phase.labels("/v1/encode", "inference").observe(time.perf_counter() - began)
        metrics.tokens.labels("encode").inc(config.tokens * len(clips))
        meta = _token_metadata(runtime, layout, info, reading, geometry)
        body = await run_in_threadpool(tokens.serialise, tokens.Tokens(triplane, meta), fmt)
    return Response(body, media_type=tokens.FORMATS[fmt])


def _token_metadata(runtime: Runtime, layout: ClipLayout, info, reading: VideoReading, geometry) -> tokens.TokenMetadata:
    """What an encoded video's token file says of the model, its clips and its source."""
    return tokens.TokenMetadata(
        model_id=runtime.model_id, weights_sha256=runtime.sha256, frames_per_clip=runtime.config.frames,
        n_frames=layout.lengths, clip_starts=layout.starts, clip_policy=layout.policy,
        source_fps=info.fps, fps=reading.fps or info.fps or media.FALLBACK_FPS,
        source_size=(info.height, info.width), geometry=tokens.Resize.of(geometry),
    )


@router.post("/v1/preview", openapi_extra=ENCODE_BODY, response_class=Response,
             responses=answers(*UPLOAD_REFUSALS, ok={200: {mime: BINARY for mime in VIDEO_TYPES.values()}}))
async def preview(
    request: Request,
    runtime: RuntimeDep,
    reading: Reading,
    first_frame: int = Query(0, ge=0, description="the first frame of the answer (at most COORDTOK_MAX_FRAMES)"),
    frames: int | None = Query(None, ge=1, description="frames in the answer (default: one clip's; at most COORDTOK_MAX_FRAMES)"),
    format: str | None = Query(None, pattern=VIDEO_FORMAT),
) -> Response:
    """The frames /v1/encode would encode (same video and query), at the model's size: frames
    first_frame.. of them, numbered as /v1/decode numbers its answer. The playground shows this
    as the original, whatever the browser can play."""
    settings, metrics, config = runtime.settings, runtime.metrics, runtime.config
    count = frames or config.frames
    _check_preview_range(first_frame, count, runtime)
    upload = (await uploads.save_upload(request, settings.upload_dir)).path  # before taking a place
    clock = RequestClock(settings.request_timeout_s)
    with removed_afterwards(upload), runtime.engine.admit():
        video, info, _ = await clock.run(request, metrics, "/v1/preview", media.read_frames, upload, settings.media_limits(),
                                         (config.height, config.width), *reading, max_frames=first_frame + count)
        upload.unlink(missing_ok=True)
        if first_frame >= len(video):
            raise RequestError(f"the video has {len(video)} frames in the requested time range; "
                               f"first_frame must be below that, not {first_frame}")
        rate = reading.fps or info.fps or media.FALLBACK_FPS
        payload = await clock.run(request, metrics, "/v1/preview", video_bytes, video[first_frame:], rate, format or "mp4")
    return Response(payload, media_type=VIDEO_TYPES[format or "mp4"])


def _check_preview_range(first_frame: int, count: int, runtime: Runtime) -> None:
    """Refuse a preview past the frames a video may have, or one whose answer is over the pixel limit."""
    settings, config = runtime.settings, runtime.config
    for name, value in (("first_frame", first_frame), ("frames", count)):
        if value > settings.max_frames:
            raise RequestError(f"{name} is {value}; a video has at most {settings.max_frames} frames on this server")
    if count * config.height * config.width > settings.max_decode_pixels:
        raise RequestError(f"{count} frames of {config.width}x{config.height} pass this server's limit of "
                           f"{settings.max_decode_pixels:,} pixels per answer: ask for fewer frames", 413)


@router.post("/v1/decode", openapi_extra=DECODE_BODY, response_class=Response,
             responses=answers(*UPLOAD_REFUSALS, ok={200: {mime: BINARY for mime in VIDEO_TYPES.values()}}))
async def decode(
    request: Request,
    runtime: RuntimeDep,
    start: int = Query(0, ge=0, description="first frame"),
    end: int | None = Query(None, gt=0, description="frame after the last"),
    fps: float | None = Query(None, ge=media.MIN_FPS, le=media.MAX_FPS, allow_inf_nan=False,
                              description="frame rate of the answer (default: the tokens' metadata 'fps')"),
    format: str | None = Query(None, pattern=VIDEO_FORMAT),
    restore_size: bool = Query(False, description="scale back to the source size (resize=pad or stretch)"),
) -> Response:
    settings, metrics, config, engine = runtime.settings, runtime.metrics, runtime.config, runtime.engine
    out = format or next((k for k, v in VIDEO_TYPES.items() if v in request.headers.get("accept", "")), "mp4")
    upload = await uploads.read_upload(request)  # before taking a place; bounded by BodyLimitMiddleware
    clock = RequestClock(settings.request_timeout_s)
    with ExitStack() as held:  # the place is the answer's once it streams
        held.enter_context(engine.admit())
        metrics.body_bytes.labels("/v1/decode").observe(len(upload.data))
        fmt = _token_format(upload)
        parsed = await run_in_threadpool(tokens.parse, upload.data, fmt, config, settings.max_clips, runtime.model_id)
        layout = parsed.metadata.clip_layout(parsed.clips, config.frames)
        stop = layout.total if end is None else end
        if not start < stop <= layout.total:
            raise RequestError(f"the frame range [{start}, {stop}) must lie within the {layout.total} frames of these tokens")
        # Everything the metadata alone can refuse is refused before any work.
        rate = fps or _metadata_fps(parsed.metadata)
        geometry = _restorable_geometry(parsed.metadata, config, settings.media_limits()) if restore_size else None
        _check_answer_pixels(stop - start, geometry.source if geometry else (config.height, config.width), geometry, runtime)
        metrics.input_frames.labels("/v1/decode").inc(stop - start)
        writer = StreamWriter(out, rate, stop - start, geometry.source if geometry else (config.height, config.width))
        stream = DecodeStream(engine, parsed.triplane, layout.pieces(start, stop), geometry, writer, clock, metrics,
                              held.pop_all())
    return await stream.answer(request, VIDEO_TYPES[out])


def _check_answer_pixels(frames: int, size: tuple[int, int], geometry, runtime: Runtime) -> None:
    """Refuse a decode whose answer (`frames` frames of `size`) passes max_decode_pixels (413)."""
    (height, width), limit = size, runtime.settings.max_decode_pixels
    if frames * height * width > limit:
        raise RequestError(f"the answer would be {frames} frames of {height}x{width}, "
                           f"{frames * height * width:,} pixels, over this server's limit of "
                           f"{limit:,} (COORDTOK_MAX_DECODE_PIXELS): ask for fewer frames (start/end)"
                           f"{' or without restore_size' if geometry else ''}", 413)


@contextmanager
def removed_afterwards(path: Path):
    """Remove the file at `path` when the block ends, however it ends."""
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _too_many_clips(error: media.TooManyFrames, frames_per_clip: int, max_clips: int) -> str:
    made = f"{math.ceil(error.frames / frames_per_clip)}" if error.frames is not None else f"more than {max_clips}"
    said = "" if error.frames is not None else " (more frames than its header says)"
    return (f"the video makes {made} clips of {frames_per_clip} frames{said}; at most {max_clips} per request: "
            "send a shorter range (start/end) or a lower fps")


def _restorable_geometry(meta: tokens.TokenMetadata, config, limits: media.MediaLimits) -> Geometry:
    """The resize the tokens' video went through, from their metadata, checked: one that can be
    undone (not a crop), the source size (that of the restored frames) within the media limits,
    the kept region within the frame."""
    geometry = meta.source_geometry((config.height, config.width))
    if geometry is None:
        raise RequestError("restore_size needs the 'geometry' and 'source_size' metadata that /v1/encode writes")
    (height, width), (top, left, h, w) = geometry.source, geometry.pad
    if not (1 <= height <= limits.max_height and 1 <= width <= limits.max_width and height * width <= limits.max_pixels):
        raise RequestError(f"metadata 'source_size' [{height}, {width}] lies outside this server's limit of "
                           f"{limits.max_height}x{limits.max_width}")
    if not (0 <= top and 0 <= left and 1 <= h and 1 <= w and top + h <= config.height and left + w <= config.width):
        raise RequestError(f"metadata 'geometry' pad box {list(geometry.pad)} lies outside the {config.height}x{config.width} frames")
    try:
        check_restorable(geometry)
    except ValueError as error:
        raise RequestError(str(error)) from None
    return geometry


def _metadata_fps(meta: tokens.TokenMetadata) -> float:
    """The frame rate the tokens' metadata gives (their source's), else FALLBACK_FPS."""
    try:
        return meta.frame_rate()
    except tokens.TokenError as error:
        raise tokens.TokenError(f"{error}; or pass the fps query parameter") from None


def _format_from_accept(accept: str) -> str:
    return next((fmt for fmt, mime in tokens.FORMATS.items() if mime in accept), "safetensors")


def _token_format(upload: uploads.Upload) -> str:
    """The token format of a body: by its content type (a multipart part's: by its file name's
    extension when that type says nothing)."""
    kind = upload.content_type.split(";")[0].strip()
    for fmt, mime in tokens.FORMATS.items():
        if kind == mime:
            return fmt
    if kind in ("application/octet-stream", ""):
        return next((fmt for fmt in tokens.FORMATS if upload.filename.endswith(f".{fmt}")), "safetensors")
    raise RequestError(f"unsupported token content type {kind!r}; send one of {sorted(tokens.FORMATS.values())}", 415)
