"""The FastAPI app: routes parse and validate, the engine batches and runs, errors map to statuses.

    uvicorn --factory service.app:create_app

encode: upload (bounded, spooled to disk) -> media.read_frames off the event loop -> clips of the
model's frame count (the last padded, its frame count kept) -> engine -> token file.
decode: token file (bounded, validated) -> engine (only the requested frames) -> mp4 / webm / npy.
A request takes its place in the engine's queue once its body has arrived (a slow body holds none);
its media work runs under the request's deadline and stops when its client goes away.
generate: a job row (service/jobs/) -> the generation lane samples, decodes through the engine,
writes result files -> GET /v1/jobs/{id} and its results.
"""
from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Router

from coordtok.formats import tokens
from coordtok.formats import video as media
from coordtok.model import CoordTok, PRESETS, load_model
from coordtok.model.checkpoint import DEFAULT_WEIGHTS, file_sha256
from coordtok.model.clips import ClipLayout, policy_for
from coordtok.service import jobs, uploads
from coordtok.service.engine import BatchStats, DeadlineExceeded, Engine, EngineError, NotReady
from coordtok.service.errors import ERROR_CONTENT, BodyTimeout, BodyTooLarge, RequestError, error_response, refusal
from coordtok.service.metrics import Metrics
from coordtok.service.settings import Settings, unknown_variables

log = logging.getLogger("coordtok.service")
try:
    VERSION = importlib.metadata.version("coordtok")
except importlib.metadata.PackageNotFoundError:  # run from a checkout that was not installed
    VERSION = "unknown"
# Routes open without an API key: liveness, readiness, metrics and the playground page (its files
# only: the API calls it makes send the key typed into it).
_OPEN_ROUTES = {"/healthz", "/readyz", "/metrics", "/", "/favicon.ico"}
_OPEN_PREFIX = "/static/"
STATIC_DIR = Path(__file__).with_name("static")  # the playground (service/static/)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
VIDEO_TYPES = {name: f.media_type for name, f in media.OUTPUT_FORMATS.items()}
# Query patterns of the answer formats.
_VIDEO_FORMAT = "^(" + "|".join(media.OUTPUT_FORMATS) + ")$"
_TOKEN_FORMAT = "^(" + "|".join(tokens.FORMATS) + ")$"
# Body limit of the routes that take no upload (a generate request is well under 1 KiB).
_SMALL_BODY_BYTES = 64 * 1024
_BINARY = {"schema": {"type": "string", "format": "binary"}}
# Request bodies the routes read themselves (streamed and bounded), declared for the OpenAPI spec.
_ENCODE_BODY = {"requestBody": {"required": True, "content": {
    **{f.media_type: _BINARY for f in media.OUTPUT_FORMATS.values() if f.codec}, "application/octet-stream": _BINARY,
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}},
                                       "required": ["file"]}},
}}}
_PLANE = {"type": "array", "items": {"type": "array", "items": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}}}
_DECODE_BODY = {"requestBody": {"required": True, "content": {
    tokens.FORMATS["safetensors"]: _BINARY, tokens.FORMATS["npz"]: _BINARY,
    tokens.FORMATS["json"]: {"schema": {"type": "object", "required": ["xy", "yt", "xt"], "properties": {
        "xy": _PLANE, "yt": _PLANE, "xt": _PLANE, "metadata": {"type": "object"}}}},
    "multipart/form-data": _ENCODE_BODY["requestBody"]["content"]["multipart/form-data"],
}}}
# What each refusal means; every one answers {"error": {"type", "message"}}.
_REFUSALS = {
    400: "a multipart body that cannot be parsed",
    401: "a missing or wrong API key (when the server has keys)",
    404: "no such job, result or route",
    408: "the body did not arrive in time (COORDTOK_BODY_TIMEOUT_S, COORDTOK_BODY_MIN_RATE)",
    409: "the job has no results (yet)",
    413: "over a limit: body size, frames, clips, streams, frame size or answer pixels",
    415: "not a video FFmpeg reads, or an unsupported token content type",
    422: "invalid parameters, a damaged video or tokens this model cannot decode",
    503: "the queue is full, the server is starting or stopping, or a device ran out of memory (with Retry-After)",
    504: "the request did not finish within COORDTOK_REQUEST_TIMEOUT_S",
}
def _answers(*refusals: int, ok: dict[int, dict | None] | None = None) -> dict:
    """The `responses` of a route for the OpenAPI spec: its refusals, and its successes by status
    (`ok={200: {"video/mp4": ...}}`: content types; None: no body)."""
    documented = {status: {"description": _REFUSALS[status], "content": ERROR_CONTENT} for status in refusals}
    for status, content in (ok or {}).items():
        documented[status] = {"description": "success", **({"content": content} if content is not None else {})}
    return documented


_JSON = {"application/json": {"schema": {"type": "object"}}}
_UPLOAD_REFUSALS = (400, 401, 408, 413, 415, 422, 503, 504)


class VideoReading(NamedTuple):
    """The query that says how an uploaded video is read (`media.read_frames`' resize, fps,
    start_s and end_s, in that order)."""

    resize: str
    fps: float | None
    start: float
    end: float | None


class StartupError(Exception):
    """The server cannot start (a missing, damaged or wrong model file; no memory for warm-up)."""


def serving_devices(settings: Settings) -> list[str]:
    if settings.devices:
        return settings.devices
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


RANDOM_PREFIX = "preset:"  # a model setting `preset:NAME`: that preset with random weights


def random_preset(spec: str) -> str | None:
    """NAME of a `preset:NAME` model setting (random weights, asked for explicitly), else None."""
    return spec[len(RANDOM_PREFIX):] if spec.startswith(RANDOM_PREFIX) else None


def load_served_model(spec: str, device: str) -> CoordTok:
    """The model of a model setting: '' the bundled weights, a .safetensors path, or
    `preset:NAME` (random weights). A bare preset name is refused: it would serve random weights
    without saying so."""
    name = random_preset(spec)
    if name is not None:
        if name not in PRESETS:
            raise ValueError(f"{spec!r}: no preset {name!r}; the presets are {', '.join(sorted(PRESETS))}")
        return load_model(name, device)
    if spec in PRESETS and not Path(spec).is_file():
        raise ValueError(f"{spec!r} is a preset name, not a weights file, and a preset alone has random weights: "
                         f"pass a .safetensors file, or say '{RANDOM_PREFIX}{spec}' (coordtok: --model {spec} "
                         "--random-weights) to run random weights on purpose")
    return load_model(Path(spec) if spec else None, device)


def random_weights_warning(spec: str) -> str | None:
    """The warning a server or command gives for random weights, else None."""
    name = random_preset(spec)
    return None if name is None else (f"the model has random weights ({RANDOM_PREFIX}{name}): its reconstructions are "
                                      "noise; pass a trained .safetensors file for real ones")


def model_identity(spec: str) -> tuple[str, str]:
    """(model id, weights sha256) of a model setting ('' = the bundled model; `preset:NAME`: no weights file)."""
    name = random_preset(spec)
    if name is not None:
        return f"{name}@random", ""
    path = Path(spec) if spec else DEFAULT_WEIGHTS
    digest = file_sha256(path)
    return f"{path.stem}@{digest[:12]}", digest


def fitting_generator(generator: str, model: str, sha256: str, config, device: str) -> tuple[jobs.Generator | None, str]:
    """`jobs.load_generator` for the tokenizer of the `model` setting: none for random weights,
    since a generator is made for one trained tokenizer's weights."""
    name = random_preset(model)
    if name is not None:
        return None, f"the tokenizer has random weights ({RANDOM_PREFIX}{name}); no generator is made for those"
    return jobs.load_generator(generator, sha256, config, device)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    metrics.build.info({"version": VERSION, "torch": torch.__version__})

    def on_batch(stats: BatchStats) -> None:
        metrics.batch_size.labels(stats.kind).observe(stats.requests)
        metrics.batch_frames.labels(stats.kind).observe(stats.frames)
        metrics.model_seconds.labels(stats.kind, stats.device).observe(stats.seconds)
        if stats.ok:
            metrics.frames.labels(stats.kind).inc(stats.frames)
        if stats.out_of_memory:
            metrics.oom.labels(stats.device).inc()

    def on_transition(job: jobs.Job) -> None:
        metrics.job_transitions.labels(job.status).inc()
        if job.status == "running" and job.attempts == 1:
            metrics.job_wait.observe(job.started_at - job.created_at)
        elif job.status in jobs.FINISHED and job.started_at is not None:
            metrics.job_duration.labels(job.status).observe(job.finished_at - job.started_at)
            if job.status == "succeeded":
                metrics.videos_generated.inc(job.num_videos)

    def on_sampled(steps: int, seconds: float) -> None:
        metrics.sampling_rate.observe(steps / max(seconds, 1e-9))

    async def sweep_periodically(store: jobs.JobStore) -> None:
        while True:
            removed = await run_in_threadpool(store.sweep, settings.job_retention_hours * 3600)
            if removed:
                log.info("removed expired jobs", extra={"jobs": removed})
            await asyncio.sleep(settings.job_sweep_interval_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for warning in unknown_variables():
            log.warning(warning)
        devices = serving_devices(settings)
        models: dict[str, CoordTok] = {}
        for device in devices:
            started = time.perf_counter()
            try:
                models[device] = await run_in_threadpool(load_served_model, settings.model, device)
            except Exception as error:  # the server must not start; `coordtok serve` prints this and exits 2
                app.state.startup_error = (f"cannot load the model {settings.model or DEFAULT_WEIGHTS} on {device}: "
                                           f"{type(error).__name__}: {error}")
                raise StartupError(app.state.startup_error) from None
            metrics.model_load.labels(device).set(time.perf_counter() - started)
        model_id, sha256 = model_identity(settings.model)
        app.state.model_warning = random_weights_warning(settings.model)
        if app.state.model_warning:
            log.warning(app.state.model_warning)
        config = next(iter(models.values())).config
        metrics.model.info({"model_id": model_id, "frames": str(config.frames), "tokens": str(config.tokens)})
        engine = Engine(models, settings.batch_max_frames, settings.batch_wait_ms, settings.max_queue,
                        settings.request_timeout_s, on_batch=on_batch, compile_decoder=settings.compile_decoder)
        try:  # the largest batches, in the serving dtype: running out of memory shows now, not on a request
            warm_ups = await run_in_threadpool(engine.warm_up)
        except Exception as error:
            app.state.startup_error = (f"the warm-up on the largest batch (COORDTOK_BATCH_MAX_FRAMES="
                                       f"{settings.batch_max_frames}) failed: {type(error).__name__}: {error}")
            raise StartupError(app.state.startup_error) from None
        for report in warm_ups:
            metrics.model_load.labels(report.device).inc(report.seconds)
            if report.peak_memory_bytes is not None:
                metrics.warmup_memory.labels(report.device).set(report.peak_memory_bytes)
        engine.start()
        # Only a server with a generator owns the jobs dir: it recovers, runs and sweeps jobs.
        # Without one, jobs can still be listed and downloaded, and generate answers 503.
        store = jobs.JobStore(settings.jobs_dir, on_transition)
        generator, app.state.generator_problem = await run_in_threadpool(
            fitting_generator, settings.generator, settings.model, sha256, config, devices[0])
        lane = sweeper = None
        if generator is not None:
            requeued = await run_in_threadpool(store.recover)
            identity = jobs.token_identity(config, model_id, sha256, generator.model_id)
            lane = jobs.GenerationLane(store, generator, engine, asyncio.get_running_loop(), identity,
                                       settings.generation_concurrency, on_sampled=on_sampled)
            lane.start()
            sweeper = asyncio.ensure_future(sweep_periodically(store))
            log.info("generator loaded", extra={"generator": generator.model_id, "requeued_jobs": requeued})
        else:  # turned off on purpose ("none"): no warning
            log.log(logging.INFO if settings.generator == "none" else logging.WARNING, "generation is off: %s",
                    app.state.generator_problem)
        app.state.engine, app.state.config, app.state.devices = engine, config, devices
        app.state.model_id, app.state.sha256 = model_id, sha256
        app.state.store, app.state.generator, app.state.lane = store, generator, lane
        metrics.ready.set(1)
        yield
        metrics.ready.set(0)
        engine.stopping.set()  # the one stop signal: no new work; the lane's running job goes back to the queue
        if lane is not None:
            await run_in_threadpool(lane.join, settings.drain_timeout_s)
            sweeper.cancel()
        deadline = time.monotonic() + settings.drain_timeout_s
        while engine.in_system and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        engine.stop()
        store.close()

    app = FastAPI(title="CoordTok", version=VERSION, lifespan=lifespan)
    state = app.state  # engine, config, devices, model_id, sha256: set once the model is loaded

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)  # gone during the upload
    async def client_gone(request: Request, error: Exception) -> Response:
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"

    @app.exception_handler(media.MediaError)
    @app.exception_handler(uploads.UploadError)
    @app.exception_handler(tokens.TokenError)
    @app.exception_handler(EngineError)
    @app.exception_handler(RequestError)
    @app.exception_handler(jobs.JobError)
    async def known_error(request: Request, error: Exception) -> JSONResponse:
        request.state.failure = type(error).__name__
        return refusal(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        request.state.failure = "ValidationError"
        message = "; ".join(f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors())
        return error_response("ValidationError", message, 422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        """Starlette's own refusals (unknown route 404, method 405) in the same shape. A 405's
        `Allow` names the methods of every route of the path (Starlette's, only the first's)."""
        headers = error.headers
        if error.status_code == 405:
            allowed = {method for route in app.router.routes if route.matches(request.scope)[0] is Match.PARTIAL
                       for method in getattr(route, "methods", None) or ()}
            headers = {**(headers or {}), "Allow": ", ".join(sorted(allowed))}
        return error_response("HTTPError", str(error.detail), error.status_code, headers)

    def body_limit(path: str) -> int:
        if path in ("/v1/encode", "/v1/preview"):  # a video
            return settings.max_upload_bytes
        if path == "/v1/decode":  # the largest token file of max_clips clips the model could take
            config = getattr(state, "config", None)
            largest = tokens.largest_file_bytes(config, settings.max_clips) if config is not None else _SMALL_BODY_BYTES
            return min(settings.max_upload_bytes, largest)
        return _SMALL_BODY_BYTES

    # Outermost last: CORS (a browser's preflight carries no key), then authentication and
    # observation, then the body limit, which applies whoever reads the body.
    app.add_middleware(BodyLimitMiddleware, limit_of=body_limit, timeout_s=settings.body_timeout_s,
                       min_rate=settings.body_min_rate)
    app.add_middleware(ObserveMiddleware, metrics=metrics, keys=[k.get_secret_value().encode() for k in settings.api_keys],
                       router=app.router)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Accept", "Idempotency-Key", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "Location", "Retry-After", "Idempotent-Replayed"])

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(STATIC_DIR / "favicon.ico", media_type="image/x-icon")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """Alive unless every model replica was taken out of service: then 503, so that the process is restarted."""
        if hasattr(state, "engine") and not state.engine.alive:
            return JSONResponse({"status": "no device in service", "devices": state.engine.states()}, 503)
        return JSONResponse({"status": "alive"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = hasattr(state, "engine") and state.engine.ready
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses=_answers(ok={200: {"text/plain": {"schema": {"type": "string"}}}}))
    async def prometheus() -> PlainTextResponse:
        if hasattr(state, "engine"):
            metrics.queue_size.set(state.engine.in_system)
            for worker in state.engine.workers:
                metrics.running.labels(str(worker.device)).set(worker.running)
            metrics.sample_devices(state.devices)
            for status, count in (await run_in_threadpool(state.store.counts)).items():
                metrics.jobs.labels(status).set(count)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=_answers(401))
    async def models() -> dict:
        config = state.config
        return {"models": [{
            "id": state.model_id, "weights_sha256": state.sha256, "devices": state.devices, "warning": state.model_warning,
            "config": json.loads(config.to_json()),
            "token_shape": {name: [*shape] for name, shape in tokens.plane_shapes(config).items()},
            "tokens_per_clip": config.tokens,
        }], "generator": None if state.generator is None else {
            "id": state.generator.model_id, "classes": state.generator.num_classes, "samplers": list(jobs.SAMPLERS),
        }}

    def video_reading(
        resize: str = Query("crop", pattern="^(crop|pad|stretch)$"),
        fps: float | None = Query(None, ge=media.MIN_FPS, le=media.MAX_FPS, allow_inf_nan=False,
                                  description="resample to this rate (default: the source's)"),
        start: float = Query(0.0, ge=0, le=settings.max_duration_s, allow_inf_nan=False, description="seconds"),
        end: float | None = Query(None, gt=0, allow_inf_nan=False, description="seconds"),
    ) -> VideoReading:
        """How /v1/encode and /v1/preview read an uploaded video (their shared query)."""
        if end is not None and end <= start:
            raise RequestError(f"end ({end:g} s) must come after start ({start:g} s)")
        return VideoReading(resize, fps, start, end)

    @app.post("/v1/encode", openapi_extra=_ENCODE_BODY, response_class=Response,
              responses=_answers(*_UPLOAD_REFUSALS, ok={200: {**{mime: _BINARY for mime in tokens.FORMATS.values()}, **_JSON}}))
    async def encode(
        request: Request,
        reading: VideoReading = Depends(video_reading),
        format: str | None = Query(None, pattern=_TOKEN_FORMAT),
    ) -> Response:
        engine, config = state.engine, state.config
        fmt = format or _format_from_accept(request.headers.get("accept", ""))
        upload = (await uploads.save_upload(request, settings.upload_dir)).path  # before taking a place
        clock = RequestClock(settings.request_timeout_s)
        with removed_afterwards(upload), engine.admit():
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
            triplane = await unless_disconnected(request, engine.encode(clips, layout.model_n_frames()), metrics,
                                                 "/v1/encode")
            metrics.phase.labels("/v1/encode", "inference").observe(time.perf_counter() - began)
            metrics.tokens.labels("encode").inc(config.tokens * len(clips))
            meta = tokens.TokenMetadata(
                model_id=state.model_id, weights_sha256=state.sha256, frames_per_clip=config.frames,
                n_frames=layout.lengths, clip_starts=layout.starts, clip_policy=layout.policy,
                source_fps=info.fps, fps=reading.fps or info.fps or media.FALLBACK_FPS,
                source_size=(info.height, info.width), geometry=tokens.Resize.of(geometry),
            )
            body = await run_in_threadpool(tokens.serialise, tokens.Tokens(triplane, meta), fmt)
        return Response(body, media_type=tokens.FORMATS[fmt])

    @app.post("/v1/preview", openapi_extra=_ENCODE_BODY, response_class=Response,
              responses=_answers(*_UPLOAD_REFUSALS, ok={200: {mime: _BINARY for mime in VIDEO_TYPES.values()}}))
    async def preview(
        request: Request,
        reading: VideoReading = Depends(video_reading),
        first_frame: int = Query(0, ge=0, le=settings.max_frames, description="the first frame of the answer"),
        frames: int | None = Query(None, ge=1, le=settings.max_frames, description="frames in the answer (default: one clip's)"),
        format: str | None = Query(None, pattern=_VIDEO_FORMAT),
    ) -> Response:
        """The frames /v1/encode would encode (same video and query), at the model's size: frames
        first_frame.. of them, numbered as /v1/decode numbers its answer. The playground shows this
        as the original, whatever the browser can play."""
        engine, config = state.engine, state.config
        count = frames or config.frames
        if count * config.height * config.width > settings.max_decode_pixels:
            raise RequestError(f"{count} frames of {config.width}x{config.height} pass this server's limit of "
                               f"{settings.max_decode_pixels:,} pixels per answer: ask for fewer frames", 413)
        upload = (await uploads.save_upload(request, settings.upload_dir)).path  # before taking a place
        clock = RequestClock(settings.request_timeout_s)
        with removed_afterwards(upload), engine.admit():
            video, info, _ = await clock.run(request, metrics, "/v1/preview", media.read_frames, upload, settings.media_limits(),
                                             (config.height, config.width), *reading,
                                             max_frames=first_frame + count)
            upload.unlink(missing_ok=True)
            if first_frame >= len(video):
                raise RequestError(f"the video has {len(video)} frames in the requested time range; "
                                   f"first_frame must be below that, not {first_frame}")
            rate = reading.fps or info.fps or media.FALLBACK_FPS
            payload = await clock.run(request, metrics, "/v1/preview", media.video_bytes, video[first_frame:], rate, format or "mp4")
        return Response(payload, media_type=VIDEO_TYPES[format or "mp4"])

    @app.post("/v1/decode", openapi_extra=_DECODE_BODY, response_class=Response,
              responses=_answers(*_UPLOAD_REFUSALS, ok={200: {mime: _BINARY for mime in VIDEO_TYPES.values()}}))
    async def decode(
        request: Request,
        start: int = Query(0, ge=0, description="first frame"),
        end: int | None = Query(None, gt=0, description="frame after the last"),
        fps: float | None = Query(None, ge=media.MIN_FPS, le=media.MAX_FPS, allow_inf_nan=False,
                                  description="frame rate of the answer (default: the tokens' metadata 'fps')"),
        format: str | None = Query(None, pattern=_VIDEO_FORMAT),
        restore_size: bool = Query(False, description="scale back to the source size (resize=pad or stretch)"),
    ) -> Response:
        engine, config = state.engine, state.config
        out = format or next((k for k, v in VIDEO_TYPES.items() if v in request.headers.get("accept", "")), "mp4")
        upload = await uploads.read_upload(request)  # before taking a place; bounded by BodyLimitMiddleware
        clock = RequestClock(settings.request_timeout_s)
        with engine.admit():
            metrics.body_bytes.labels("/v1/decode").observe(len(upload.data))
            fmt = _token_format(upload)
            parsed = await run_in_threadpool(tokens.parse, upload.data, fmt, config, settings.max_clips, state.model_id)
            layout = parsed.metadata.clip_layout(parsed.clips, config.frames)
            total = layout.total
            stop = total if end is None else end
            if not start < stop <= total:
                raise RequestError(f"the frame range [{start}, {stop}) must lie within the {total} frames of these tokens")
            # Everything the metadata alone can refuse is refused before any work.
            rate = fps or _metadata_fps(parsed.metadata)
            geometry = _restorable_geometry(parsed.metadata, config, settings.media_limits()) if restore_size else None
            height, width = geometry.source if geometry else (config.height, config.width)
            if (stop - start) * height * width > settings.max_decode_pixels:
                raise RequestError(f"the answer would be {stop - start} frames of {height}x{width}, "
                                   f"{(stop - start) * height * width:,} pixels, over this server's limit of "
                                   f"{settings.max_decode_pixels:,}: ask for fewer frames (start/end)"
                                   f"{' or without restore_size' if geometry else ''}", 413)
            metrics.input_frames.labels("/v1/decode").inc(stop - start)
            began = time.perf_counter()
            wanted = layout.pieces(start, stop)
            pieces = await unless_disconnected(request, asyncio.gather(*(
                engine.decode(parsed.triplane[k], frames) for k, frames, _ in wanted
            )), metrics, "/v1/decode")
            metrics.phase.labels("/v1/decode", "inference").observe(time.perf_counter() - began)
            metrics.tokens.labels("decode").inc(config.tokens * len(pieces))
            video = torch.cat([piece[0][index] for piece, (_, _, index) in zip(pieces, wanted)]).numpy()
            if geometry is not None:
                video = await clock.run(request, metrics, "/v1/decode", media.restore_source_size, video, geometry)
            began = time.perf_counter()
            payload = await clock.run(request, metrics, "/v1/decode", media.video_bytes, video, rate, out)
            metrics.phase.labels("/v1/decode", "media_encode").observe(time.perf_counter() - began)
        return Response(payload, media_type=VIDEO_TYPES[out])

    @app.post("/v1/generate", status_code=202, responses=_answers(401, 408, 413, 422, 503, ok={202: _JSON}))
    async def generate(body: jobs.GenerateRequest,
                       idempotency_key: str | None = Header(None, min_length=1, max_length=255)) -> JSONResponse:
        if state.generator is None:
            raise jobs.GeneratorUnavailable(f"no generator is loaded: {state.generator_problem}")
        if not state.engine.accepting:
            raise NotReady("the server is not accepting work (starting up or shutting down)")
        if body.num_videos > settings.max_videos_per_job:
            raise RequestError(f"num_videos is {body.num_videos}; the limit is {settings.max_videos_per_job} per job")
        if body.steps > settings.max_generation_steps:
            raise RequestError(f"steps is {body.steps}; the limit is {settings.max_generation_steps}")
        state.generator.check(body)
        job, created = await run_in_threadpool(state.store.create, body, settings.generation_batch_size,
                                               settings.max_queued_jobs, idempotency_key)
        if created:
            state.lane.notify()
        headers = {"Location": f"/v1/jobs/{job.id}", **({} if created else {"Idempotent-Replayed": "true"})}
        return JSONResponse(job.to_json(), 202, headers=headers)

    @app.get("/v1/jobs", responses=_answers(401, 422))
    async def list_jobs(
        limit: int = Query(20, ge=1, le=100),
        cursor: str | None = Query(None, pattern="^[0-9]{1,18}$", description="next_cursor of the previous page"),
        status: str | None = Query(None, pattern="^(" + "|".join(jobs.STATUSES) + ")$"),
    ) -> dict:
        found, after = await run_in_threadpool(state.store.list, limit, int(cursor) if cursor else None, status)
        return {"jobs": [job.to_json() for job in found], "next_cursor": None if after is None else str(after)}

    @app.get("/v1/jobs/{job_id}", responses=_answers(401, 404, 422))
    async def get_job(job_id: str) -> dict:
        return (await run_in_threadpool(state.store.require, job_id)).to_json()

    @app.get("/v1/jobs/{job_id}/results/{k}", response_class=Response,
             responses=_answers(401, 404, 409, 422, ok={200: {mime: _BINARY for _, mime in jobs.RESULT_TYPES.values()}}))
    async def get_result(job_id: str, k: int) -> FileResponse:
        job = await run_in_threadpool(state.store.require, job_id)
        if not 0 <= k < job.num_videos:
            raise jobs.JobNotFound(f"job {job_id} has {job.num_videos} videos: results 0 to {job.num_videos - 1}")
        if job.status in ("queued", "running"):
            raise jobs.JobConflict(f"job {job_id} is {job.status} ({job.videos_done} of {job.num_videos} videos done); "
                                   "its results can be downloaded once it has succeeded")
        if job.status != "succeeded":
            raise jobs.JobConflict(f"job {job_id} {job.status}: it has no results")
        path = state.store.result_path(job, k)
        if not path.is_file():
            raise jobs.JobNotFound(f"result {k} of job {job_id} is gone (removed after the retention period)")
        extension, media_type = jobs.RESULT_TYPES[job.request.format]
        return FileResponse(path, media_type=media_type, filename=f"{job_id}-{k}.{extension}")

    @app.delete("/v1/jobs/{job_id}", responses=_answers(401, 404, 422, ok={200: _JSON, 202: _JSON, 204: None}))
    async def delete_job(job_id: str) -> Response:
        """Queued: cancelled at once (200). Running: stops at its next sampling step (202).
        Finished: the job and its results are deleted (204)."""
        job = await run_in_threadpool(state.store.require, job_id)
        if job.status in jobs.FINISHED:
            await run_in_threadpool(state.store.delete, job_id)
            return Response(status_code=204)
        job = await run_in_threadpool(state.store.cancel, job_id)
        if job.status == "running" and state.lane is not None:
            state.lane.cancel(job_id)
            return JSONResponse(job.to_json(), 202)
        return JSONResponse(job.to_json(), 200)

    return app


class ObserveMiddleware:
    """Authenticate, give each request an id (echoed in `X-Request-ID`), count it and log it
    (never the key). Plain ASGI, so that routes still see the client's disconnect."""

    def __init__(self, app, metrics: Metrics, keys: list[bytes], router: Router) -> None:
        self.app, self.metrics, self.keys, self.router = app, metrics, keys, router

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = Headers(scope=scope)
        route = scope["path"]
        request_id = headers.get("x-request-id", "")
        if not _REQUEST_ID.fullmatch(request_id):
            request_id = uuid.uuid4().hex
        status = 500

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        open_route = route in _OPEN_ROUTES or route.startswith(_OPEN_PREFIX)
        if self.keys and not open_route and not _authorised(headers.get("authorization", ""), self.keys):
            unauthorized = error_response("Unauthorized", "send a valid API key as 'Authorization: Bearer KEY'", 401,
                                          {"WWW-Authenticate": "Bearer"})
            await unauthorized(scope, receive, send_with_id)
        else:
            await self.app(scope, receive, send_with_id)
        seconds = time.perf_counter() - started
        # Labelled by route template (/v1/jobs/{job_id}: one label for every job), never by the raw
        # path: refused and unknown paths would grow /metrics without bound.
        template = route_template(self.router, scope)
        if template.startswith("/v1/") or template == UNMATCHED:
            self.metrics.requests.labels(template, str(status)).inc()
            self.metrics.duration.labels(template).observe(seconds)
            if status >= 400:  # the reason: the error type a handler recorded, else the status
                reason = scope.get("state", {}).get("failure", "Unauthorized" if status == 401 else f"http_{status}")
                self.metrics.failures.labels(template, reason).inc()
        log.info("request", extra={"request_id": request_id, "method": scope["method"], "route": route,
                                   "status": status, "seconds": round(seconds, 4)})


UNMATCHED = "unmatched"  # the metrics' route label of a path no route matches


def route_template(router: Router, scope) -> str:
    """The path template of the route `scope` matches (its path, whatever the method), else UNMATCHED."""
    return next((route.path for route in router.routes if route.matches(scope)[0] is not Match.NONE), UNMATCHED)


class ClientGone(Exception):
    """The client disconnected while its work waited or ran."""


class RequestClock:
    """The deadline of a request's work (`request_timeout_s` from the end of its body), and
    whether its client has gone: `check` raises DeadlineExceeded or ClientGone, and media
    functions call it before each frame (their `check_stop`)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s, self.deadline, self.gone = timeout_s, time.monotonic() + timeout_s, False

    def check(self) -> None:
        if self.gone:
            raise ClientGone()
        if time.monotonic() > self.deadline:
            raise DeadlineExceeded(f"the request did not finish within {self.timeout_s:g} s")

    async def run(self, request: Request, metrics: Metrics, route: str, function, *args, **kwargs):
        """`function(*args, check_stop=self.check, **kwargs)` in a worker thread; it stops at its
        next frame when the deadline passes or the client disconnects."""
        self.check()
        work = run_in_threadpool(function, *args, check_stop=self.check, **kwargs)
        return await unless_disconnected(request, work, metrics, route, on_gone=self.mark_gone)

    def mark_gone(self) -> None:
        self.gone = True


async def unless_disconnected(request: Request, work, metrics: Metrics, route: str, on_gone: Callable[[], None] | None = None):
    """Await `work` (engine calls, media work in a thread), cancelling it if the client
    disconnects first: cancelled work still queued is skipped by the engine; `on_gone` tells work
    in a thread to stop. Counted in `coordtok_requests_cancelled`."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    if on_gone is not None:
        on_gone()
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())  # its ClientGone is expected
    metrics.cancelled.labels(route).inc()
    raise ClientGone()


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


def _authorised(header: str, keys: list[bytes]) -> bool:
    """Constant-time comparison of a bearer token with every configured key."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return any([hmac.compare_digest(token.encode(), key) for key in keys])


def _restorable_geometry(meta: tokens.TokenMetadata, config, limits: media.MediaLimits) -> media.Geometry:
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
        media.check_restorable(geometry)
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


# A body's minimum rate counts from this many seconds after its headers (connection set-up, a
# client's first read of the file).
_BODY_RATE_GRACE_S = 5.0


class BodyLimitMiddleware:
    """Bound every request body while it streams in, whoever reads it (the upload code, FastAPI's
    JSON parsing), in size by `limit_of(path)` bytes and in time: complete within `timeout_s` of
    the headers and, from `_BODY_RATE_GRACE_S` on, arriving at `min_rate` bytes/s on average.

    A declared Content-Length past the limit is refused with 413 before the app runs; a body that
    passes it while streaming (chunked, without Content-Length) ends the read with `BodyTooLarge`,
    one that is late with `BodyTimeout` (408), and the answer is that refusal whatever the app
    made of the failed read. A refusal closes the connection: the rest of the body is not read."""

    def __init__(self, app, limit_of: Callable[[str], int], timeout_s: float, min_rate: float) -> None:
        self.app, self.limit_of, self.timeout_s, self.min_rate = app, limit_of, timeout_s, min_rate

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_of(scope["path"])
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await _refusal(BodyTooLarge(f"the body is {declared} bytes; the limit is {limit}"))(scope, receive, send)
        arrived = time.monotonic()
        received, more, refused, started, replaced = 0, True, None, False, False

        async def bounded_receive():
            nonlocal received, more, refused
            if not more:  # the body is complete: what follows is the disconnect a route may wait for
                return await receive()
            due = min(arrived + self.timeout_s, arrived + _BODY_RATE_GRACE_S + received / self.min_rate)
            try:
                message = await asyncio.wait_for(receive(), due - time.monotonic())
            except asyncio.TimeoutError:
                refused = BodyTimeout(
                    f"the body did not arrive in time: {received} bytes after {time.monotonic() - arrived:.1f} s; "
                    f"a body must arrive within {self.timeout_s:g} s, at {self.min_rate:g} bytes/s or faster")
                raise refused from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                more = message.get("more_body", False)
                if received > limit:
                    refused = BodyTooLarge(f"the body exceeds the limit of {limit} bytes")
                    raise refused
            else:
                more = False
            return message

        async def checked_send(message) -> None:
            nonlocal started, replaced
            if message["type"] == "http.response.start":
                started = True
                if refused is not None:  # whatever the app answered (a 400 for a body it could not read, say)
                    replaced = True
                    return await _refusal(refused)(scope, receive, send)
            if not replaced:
                await send(message)

        try:
            await self.app(scope, bounded_receive, checked_send)
        except Exception:
            if refused is None or started:
                raise
            await _refusal(refused)(scope, receive, send)


def _refusal(error: RequestError) -> JSONResponse:
    """The answer to a body refused while it arrived; the connection is closed after it."""
    return refusal(error, {"Connection": "close"})
