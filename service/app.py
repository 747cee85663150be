"""The FastAPI app: routes parse and validate, the engine batches and runs, errors map to statuses.

    uvicorn --factory coordtok.service.app:create_app

`create_app(settings)` builds the app around a runtime (service/runtime.py) that its lifespan
starts and stops: the model on every device, the engine, the job store and the generation lane.
Routes (service/routes/: tokens, jobs, system) receive it through `Depends`; the middleware
(service/middleware.py) authenticates, observes and bounds bodies; service/errors.py answers
every error.
"""
from __future__ import annotations

from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from coordtok.service.errors import add_handlers
from coordtok.service.metrics import Metrics
from coordtok.service.middleware import add_middleware
from coordtok.service.routes import jobs, system, tokens
from coordtok.service.runtime import VERSION, Runtime, StartupError
from coordtok.service.settings import Settings


def create_app(settings: Settings | None = None, address: str | None = None) -> FastAPI:
    """The app for `settings` (default: from the environment), served at `address` (host:port,
    which `coordtok serve` binds before the app starts; None: run in this process). Its state:
    `metrics` (from the start), `runtime` (None until the lifespan has started it) and
    `startup_error` (why it could not start, which `coordtok serve` prints)."""
    settings = settings or Settings()
    metrics = Metrics()
    metrics.build.info({"version": VERSION, "torch": torch.__version__})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            app.state.runtime = await Runtime.start(settings, metrics, address)
        except StartupError as error:
            app.state.startup_error = str(error)
            raise
        yield
        await app.state.runtime.stop()

    app = FastAPI(title="CoordTok", version=VERSION, lifespan=lifespan)
    app.state.metrics, app.state.runtime, app.state.startup_error = metrics, None, None
    add_handlers(app)
    add_middleware(app, settings, metrics)
    for area in (system, tokens, jobs):  # flat, as app.routes: the metrics' route templates and a 405's Allow
        app.router.routes.extend(area.router.routes)  # read them (FastAPI's include_router nests them in new versions)
    app.mount("/static", StaticFiles(directory=system.STATIC_DIR), name="static")
    return app
