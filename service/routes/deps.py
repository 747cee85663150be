"""What routes receive through `Depends`: the runtime, once the server has started, and its parts."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from coordtok.service import jobs
from coordtok.service.engine import NotReady
from coordtok.service.metrics import Metrics
from coordtok.service.runtime import Runtime


def started_runtime(request: Request) -> Runtime:
    """The app's runtime; NotReady (503) while the server is still starting."""
    runtime = request.app.state.runtime
    if runtime is None:
        raise NotReady("the server is starting: the model is not loaded yet")
    return runtime


def optional_runtime(request: Request) -> Runtime | None:
    """The app's runtime, or None while the server is starting (for health and metrics)."""
    return request.app.state.runtime


def app_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def job_store(runtime: Annotated[Runtime, Depends(started_runtime)]) -> jobs.JobStore:
    return runtime.store


RuntimeDep = Annotated[Runtime, Depends(started_runtime)]
MaybeRuntime = Annotated[Runtime | None, Depends(optional_runtime)]
MetricsDep = Annotated[Metrics, Depends(app_metrics)]
StoreDep = Annotated[jobs.JobStore, Depends(job_store)]
