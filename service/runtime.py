"""The server's runtime: everything the routes use once the model is loaded, built and torn down in
one place.

`Runtime.start` loads the model on every serving device, warms the engine up on the largest
batches, opens the job store and, with a generator, starts the generation lane and the sweep of
expired jobs; `Runtime.stop` drains and closes them in the reverse order. The app's lifespan calls
both (service/app.py) and routes receive the runtime through `Depends` (service/routes/deps.py).
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from dataclasses import dataclass

import torch
from starlette.concurrency import run_in_threadpool

from coordtok.model import CoordTok
from coordtok.model.checkpoint import DEFAULT_WEIGHTS
from coordtok.model.config import CoordTokConfig
from coordtok.service import jobs
from coordtok.service.engine import Engine
from coordtok.service.metrics import Metrics
from coordtok.service.model_setting import fitting_generator, load_served_model, model_identity, random_weights_warning
from coordtok.service.settings import Settings, unknown_variables

log = logging.getLogger("coordtok.service")
try:
    VERSION = importlib.metadata.version("coordtok")
except importlib.metadata.PackageNotFoundError:  # run from a checkout that was not installed
    VERSION = "unknown"


class StartupError(Exception):
    """The server cannot start (a missing, damaged or wrong model file; no memory for warm-up)."""


def serving_devices(settings: Settings) -> list[str]:
    if settings.devices:
        return settings.devices
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


@dataclass
class Runtime:
    """The served model (its config, identity and devices), the engine that runs it, the job
    store and, when a generator is loaded, the generation lane."""

    settings: Settings
    metrics: Metrics
    engine: Engine
    config: CoordTokConfig
    devices: list[str]
    model_id: str
    sha256: str
    model_warning: str | None
    store: jobs.JobStore
    generator: jobs.Generator | None
    generator_problem: str  # why there is no generator ('' when there is one)
    lane: jobs.GenerationLane | None = None
    sweeper: asyncio.Future | None = None
    jobs_lock: jobs.JobsDirLock | None = None  # SQLite with a generator: this server's lane owns the jobs dir

    @classmethod
    async def start(cls, settings: Settings, metrics: Metrics, address: str | None = None) -> Runtime:
        """Load, warm up and start everything; StartupError saying why the server cannot start.
        `address` (host:port, None for an app run in this process) is recorded in the jobs dir's lock,
        which is taken first: a second server on a held jobs dir refuses before it loads anything."""
        for warning in unknown_variables():
            log.warning(warning)
        store = jobs.JobStore(settings.jobs_dir, metrics.observe_transition, database=settings.jobs_db.get_secret_value(),
                              results_dir=settings.results_dir)
        jobs_lock = _lock_jobs_dir(store, settings, address)
        try:
            runtime = await cls._load(settings, metrics, store, jobs_lock)
        except BaseException:
            if jobs_lock is not None:
                jobs_lock.release()
            raise
        metrics.ready.set(1)
        return runtime

    @classmethod
    async def _load(cls, settings: Settings, metrics: Metrics, store: jobs.JobStore,
                    jobs_lock: jobs.JobsDirLock | None) -> Runtime:
        devices = serving_devices(settings)
        models = await _load_models(settings, devices, metrics)
        model_id, sha256 = model_identity(settings.model)
        model_warning = random_weights_warning(settings.model)
        if model_warning:
            log.warning(model_warning)
        config = next(iter(models.values())).config
        metrics.model.info({"model_id": model_id, "frames": str(config.frames), "tokens": str(config.tokens)})
        engine = Engine(models, settings.batch_max_frames, settings.batch_wait_ms, settings.max_queue,
                        settings.request_timeout_s, on_batch=metrics.observe_batch, compile_decoder=settings.compile_decoder)
        await _warm_up(engine, settings, metrics)
        engine.start()
        # Only a server with a generator owns the jobs dir: it recovers, runs and sweeps jobs.
        # Without one, jobs can still be listed and downloaded, and generate answers 503.
        generator, problem = await run_in_threadpool(
            fitting_generator, settings.generator, settings.model, sha256, config, devices[0])
        runtime = cls(settings, metrics, engine, config, devices, model_id, sha256, model_warning, store, generator, problem)
        if generator is not None:
            runtime.jobs_lock = jobs_lock
            await runtime._start_generation()
        else:  # turned off on purpose ("none"): no warning
            if jobs_lock is not None:  # the generator did not load: nothing here runs jobs
                jobs_lock.release()
            log.log(logging.INFO if settings.generator == "none" else logging.WARNING, "generation is off: %s", problem)
        return runtime

    @property
    def job_models(self) -> jobs.JobModels | None:
        """The models of the jobs this server makes and runs (None without a generator)."""
        if self.generator is None:
            return None
        return jobs.JobModels(self.model_id, self.sha256, self.generator.model_id, self.generator.sha256)

    async def _start_generation(self) -> None:
        """Start the lane (which, on SQLite, requeues the jobs a previous run left running in the
        jobs dir this server has locked) and the sweep."""
        identity = jobs.token_identity(self.config, self.model_id, self.sha256, self.generator.model_id)
        self.lane = jobs.GenerationLane(self.store, self.generator, self.engine, asyncio.get_running_loop(), identity,
                                        self.job_models, self.settings.generation_concurrency, self.settings.job_lease_s,
                                        on_sampled=self.metrics.observe_sampling)
        requeued = await run_in_threadpool(self.lane.start)
        self.sweeper = asyncio.ensure_future(self._sweep_periodically())
        log.info("generator loaded", extra={"generator": self.generator.model_id, "requeued_jobs": requeued,
                                            "jobs": self.store.location})

    async def _sweep_periodically(self) -> None:
        while True:
            removed = await run_in_threadpool(self.store.sweep, self.settings.job_retention_hours * 3600)
            if removed:
                log.info("removed expired jobs", extra={"jobs": removed})
            await asyncio.sleep(self.settings.job_sweep_interval_s)

    async def stop(self) -> None:
        """Stop taking work, let the work in flight finish (within drain_timeout_s), close."""
        self.metrics.ready.set(0)
        self.engine.stopping.set()  # the one stop signal: no new work; the lane's running job goes back to the queue
        if self.lane is not None:
            ended = await run_in_threadpool(self.lane.join, self.settings.drain_timeout_s)
            self.sweeper.cancel()
            if ended and self.jobs_lock is not None:  # a job still running keeps it until the process ends
                self.jobs_lock.release()
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self.engine.in_system and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.engine.stop()
        self.store.close()


def _lock_jobs_dir(store: jobs.JobStore, settings: Settings, address: str | None) -> jobs.JobsDirLock | None:
    """The jobs dir's lock for a server that will run jobs from it (SQLite, generation not
    turned off), taken before the models load; StartupError naming the server that holds it."""
    if not store.single_server or settings.generator == "none":
        return None
    try:
        return jobs.JobsDirLock.take(store.root, address)
    except jobs.JobsDirBusy as error:
        raise StartupError(str(error)) from None


async def _load_models(settings: Settings, devices: list[str], metrics: Metrics) -> dict[str, CoordTok]:
    models: dict[str, CoordTok] = {}
    for device in devices:
        started = time.perf_counter()
        try:
            models[device] = await run_in_threadpool(load_served_model, settings.model, device)
        except Exception as error:  # the server must not start; `coordtok serve` prints this and exits 2
            raise StartupError(f"cannot load the model {settings.model or DEFAULT_WEIGHTS} on {device}: "
                               f"{type(error).__name__}: {error}") from None
        metrics.model_load.labels(device).set(time.perf_counter() - started)
    return models


async def _warm_up(engine: Engine, settings: Settings, metrics: Metrics) -> None:
    """Run the largest batches, in the serving dtype: running out of memory shows now, not on a request."""
    try:
        warm_ups = await run_in_threadpool(engine.warm_up)
    except Exception as error:
        raise StartupError(f"the warm-up on the largest batch (COORDTOK_BATCH_MAX_FRAMES="
                           f"{settings.batch_max_frames}) failed: {type(error).__name__}: {error}") from None
    for report in warm_ups:
        metrics.model_load.labels(report.device).inc(report.seconds)
        if report.peak_memory_bytes is not None:
            metrics.warmup_memory.labels(report.device).set(report.peak_memory_bytes)
