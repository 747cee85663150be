"""The server itself: GET /healthz, /readyz, /metrics, /v1/models, and the playground (/, its
static files, the favicon)."""
from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from coordtok.formats import tokens
from coordtok.service import jobs
from coordtok.service.routes.deps import MaybeRuntime, MetricsDep, RuntimeDep
from coordtok.service.routes.spec import answers

STATIC_DIR = Path(__file__).parent.parent / "static"  # the playground (service/static/)
router = APIRouter()


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> FileResponse:
    return FileResponse(STATIC_DIR / "favicon.ico", media_type="image/x-icon")


@router.get("/healthz")
async def healthz(runtime: MaybeRuntime) -> JSONResponse:
    """Alive unless every model replica was taken out of service: then 503, so that the process is restarted."""
    if runtime is not None and not runtime.engine.alive:
        return JSONResponse({"status": "no device in service", "devices": runtime.engine.states()}, 503)
    return JSONResponse({"status": "alive"})


@router.get("/readyz")
async def readyz(runtime: MaybeRuntime) -> JSONResponse:
    ready = runtime is not None and runtime.engine.ready
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse,
            responses=answers(ok={200: {"text/plain": {"schema": {"type": "string"}}}}))
async def prometheus(runtime: MaybeRuntime, metrics: MetricsDep) -> PlainTextResponse:
    if runtime is not None:
        metrics.refresh(runtime.engine, runtime.devices, await run_in_threadpool(runtime.store.counts))
    return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", responses=answers(401))
async def models(runtime: RuntimeDep) -> dict:
    config, generator = runtime.config, runtime.generator
    return {"models": [{
        "id": runtime.model_id, "weights_sha256": runtime.sha256, "devices": runtime.devices,
        "warning": runtime.model_warning, "config": json.loads(config.to_json()),
        "token_shape": {name: [*shape] for name, shape in tokens.plane_shapes(config).items()},
        "tokens_per_clip": config.tokens,
    }], "generator": None if generator is None else {
        "id": generator.model_id, "classes": generator.num_classes, "samplers": list(jobs.SAMPLERS),
    }}
