"""Generation jobs: POST /v1/generate creates one, GET /v1/jobs lists them, GET /v1/jobs/{id} and
its results, DELETE /v1/jobs/{id} cancels or deletes one (service/jobs/)."""
from __future__ import annotations

from fastapi import APIRouter, Header, Query
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from coordtok.service import jobs
from coordtok.service.engine import NotReady
from coordtok.service.errors import RequestError
from coordtok.service.routes.deps import RuntimeDep, StoreDep
from coordtok.service.routes.spec import BINARY, JSON, answers

router = APIRouter()


@router.post("/v1/generate", status_code=202, responses=answers(401, 408, 413, 422, 503, ok={202: JSON}))
async def generate(body: jobs.GenerateRequest, runtime: RuntimeDep,
                   idempotency_key: str | None = Header(None, min_length=1, max_length=255)) -> JSONResponse:
    settings = runtime.settings
    if runtime.generator is None:
        raise jobs.GeneratorUnavailable(f"no generator is loaded: {runtime.generator_problem}")
    if not runtime.engine.accepting:
        raise NotReady("the server is not accepting work (starting up or shutting down)")
    if body.num_videos > settings.max_videos_per_job:
        raise RequestError(f"num_videos is {body.num_videos}; the limit is {settings.max_videos_per_job} per job")
    if body.steps > settings.max_generation_steps:
        raise RequestError(f"steps is {body.steps}; the limit is {settings.max_generation_steps}")
    runtime.generator.check(body)
    job, created = await run_in_threadpool(runtime.store.create, body, settings.generation_batch_size,
                                           settings.max_queued_jobs, runtime.job_models, idempotency_key)
    if created:
        runtime.lane.notify()
    headers = {"Location": f"/v1/jobs/{job.id}", **({} if created else {"Idempotent-Replayed": "true"})}
    return JSONResponse(job.to_json(runtime.job_models), 202, headers=headers)


@router.get("/v1/jobs", responses=answers(401, 422))
async def list_jobs(
    runtime: RuntimeDep,
    limit: int = Query(20, ge=1, le=100),
    cursor: str | None = Query(None, pattern="^[0-9]{1,18}$", description="next_cursor of the previous page"),
    status: str | None = Query(None, pattern="^(" + "|".join(jobs.STATUSES) + ")$"),
) -> dict:
    found, after = await run_in_threadpool(runtime.store.list, limit, int(cursor) if cursor else None, status)
    return {"jobs": [job.to_json(runtime.job_models) for job in found], "next_cursor": None if after is None else str(after)}


@router.get("/v1/jobs/{job_id}", responses=answers(401, 404, 422))
async def get_job(job_id: str, runtime: RuntimeDep) -> dict:
    """A queued job that this server's models do not run says what it waits for (`waiting_for`)."""
    return (await run_in_threadpool(runtime.store.require, job_id)).to_json(runtime.job_models)


@router.get("/v1/jobs/{job_id}/results/{k}", response_class=Response,
            responses=answers(401, 404, 409, 422, ok={200: {mime: BINARY for _, mime in jobs.RESULT_TYPES.values()}}))
async def get_result(job_id: str, k: int, store: StoreDep) -> FileResponse:
    job = await run_in_threadpool(store.require, job_id)
    if not 0 <= k < job.num_videos:
        raise jobs.JobNotFound(f"job {job_id} has {job.num_videos} videos: results 0 to {job.num_videos - 1}")
    if job.status in ("queued", "running"):
        raise jobs.JobConflict(f"job {job_id} is {job.status} ({job.videos_done} of {job.num_videos} videos done); "
                               "its results can be downloaded once it has succeeded")
    if job.status != "succeeded":
        raise jobs.JobConflict(f"job {job_id} {job.status}: it has no results")
    path = store.result_path(job, k)
    if not path.is_file():
        raise jobs.JobNotFound(f"result {k} of job {job_id} is gone (removed after the retention period)")
    extension, media_type = jobs.RESULT_TYPES[job.request.format]
    return FileResponse(path, media_type=media_type, filename=f"{job_id}-{k}.{extension}")


@router.delete("/v1/jobs/{job_id}", responses=answers(401, 404, 422, ok={200: JSON, 202: JSON, 204: None}))
async def delete_job(job_id: str, runtime: RuntimeDep) -> Response:
    """Queued: cancelled at once (200). Running: stops at its next sampling step (202), on
    whichever server runs it. Finished: the job and its results are deleted (204)."""
    job = await run_in_threadpool(runtime.store.require, job_id)
    if job.status in jobs.FINISHED:
        await run_in_threadpool(runtime.store.delete, job_id)
        return Response(status_code=204)
    job = await run_in_threadpool(runtime.store.cancel, job_id)
    return JSONResponse(job.to_json(runtime.job_models), 202 if job.status == "running" else 200)
