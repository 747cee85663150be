"""The generation lane: the threads that run jobs.

A lane thread claims the oldest queued job that its models can run (`running`, under a lease),
samples triplanes with the SiT generator a group of videos at a time (progress written to the job),
decodes each video with the tokenizer the engine serves, writes its file, and marks the job
`succeeded` (or `failed`, `cancelled`). A keeper thread renews the leases of the running jobs every
third of `lease_s`; a job whose lease was lost (another server claimed it once it ran out) is left
to that server unchanged. Between sampling steps the lane asks the store, at most every `poll_s`,
whether a cancel was requested (on whichever server the request came in).

Start: on SQLite, under the jobs dir's lock its server took before loading its models
(ownership.py, service/runtime.py), the lane requeues the jobs a previous server left running; on
PostgreSQL a job left running is claimed again once its lease runs out.

Restart: videos already written are kept and only the missing ones are generated. That gives the
same files as an uninterrupted run because video k depends only on (seed, k) and the lane always
samples the same groups of videos together (`JobRequest.groups`); a group with any video missing is
sampled again whole, with the same shapes as the first time. When the server stops (the engine's
`stopping` signal) the running job goes back to the queue at its next sampling step the same way.

Why the lane cannot starve encode and decode: it has its own threads (`concurrency` jobs at a
time). Sampling runs on the generator's device between the engine's batches (kernels of both
interleave on a GPU; threads share the cores on a CPU), and every decode of a generated video is
admitted and queued like a /v1/decode request of one clip, one video at a time per running job: it
takes a place among the engine's `max_queue` (a full queue makes the lane wait, not the requests),
is batched with and waits behind requests, and the engine's deadlines and device health apply.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from coordtok.formats import tokens
from coordtok.formats.video_write import video_bytes
from coordtok.model import Triplane
from coordtok.model.clips import policy_for
from coordtok.model.config import CoordTokConfig
from coordtok.model.transport import SamplingCancelled
from coordtok.service.engine import Engine, NotReady, QueueFull
from coordtok.service.jobs.generator import Generator
from coordtok.service.jobs.job import Job, JobModels
from coordtok.service.jobs.request import JobRequest

log = logging.getLogger("coordtok.jobs")

ADMISSION_RETRY_S = 0.05  # the lane's pause before asking again for a place in a full engine queue


class JobQueue(Protocol):
    """What the lane needs of a job store (`JobStore`, over SQLite or PostgreSQL). Every change to
    a job the lane runs names the lane (`owner`) and is made only while it holds the job's lease."""

    root: Path
    single_server: bool

    def recover(self) -> int: ...

    def claim(self, owner: str, models: JobModels, lease_s: float) -> Job | None: ...

    def renew(self, owner: str, lease_s: float) -> set[str]: ...

    def progress(self, job_id: str, owner: str, step: int, videos_done: int) -> bool: ...

    def cancel_requested(self, job_id: str) -> bool: ...

    def finish(self, job_id: str, owner: str, status: str, error: str | None = None) -> Job | None: ...

    def requeue(self, job_id: str, owner: str) -> None: ...

    def has_result(self, job: Job, k: int) -> bool: ...

    def write_result(self, job: Job, k: int, payload: bytes) -> None: ...


def token_identity(config: CoordTokConfig, model_id: str, sha256: str, generator_id: str) -> tokens.TokenMetadata:
    """Metadata that generated token files carry, so that /v1/decode accepts them."""
    return tokens.TokenMetadata(model_id=model_id, weights_sha256=sha256, frames_per_clip=config.frames,
                                n_frames=(config.frames,), clip_starts=(0,), clip_policy=policy_for(config.reference_compat),
                                extra={"generator": generator_id})


def render(request: JobRequest, k: int, triplane: Triplane, frames: np.ndarray | None,
           identity: tokens.TokenMetadata) -> bytes:
    """The result file of video k: the decoded `frames` (uint8 [T, H, W, 3]) as mp4/webm, or
    its `triplane` (one clip) as a token file that /v1/decode accepts."""
    if request.format == "tokens":
        made = {"seed": str(request.seed), "index": str(k), "sampler": request.sampler, "steps": str(request.steps),
                "guidance": f"{request.guidance:g}"}
        if request.class_label is not None:
            made["class_label"] = str(request.class_label)
        meta = replace(identity, fps=request.fps, extra={**identity.extra, **made})
        return tokens.serialise(tokens.Tokens(triplane, meta), "safetensors")
    return video_bytes(frames, request.fps, request.format)


class _Stop(Exception):
    """The server is stopping: the job goes back to the queue."""


class _Cancelled(Exception):
    """The job was cancelled."""


class _LeaseLost(Exception):
    """Another server runs the job now (this lane's lease ran out): leave it alone."""


@dataclass
class _Running:
    """A job this lane runs, and what the lane has learnt about it since it was claimed."""

    job: Job
    cancelled: bool = False
    lost: bool = False  # the lease: renewed by the keeper, which sets this when it was not
    polled_at: float = 0.0  # when the store was last asked for a cancel (monotonic seconds)


class GenerationLane:
    """`concurrency` threads, each running one job at a time from `store` that a server with
    `models` runs. Decodes go through `engine`, whose requests are served on the event loop
    `loop`; the lane stops with the engine's `stopping` signal. Jobs are held under leases of
    `lease_s` seconds. `on_sampled(steps, seconds)` is called after each group of videos is
    sampled (metrics)."""

    def __init__(self, store: JobQueue, generator: Generator, engine: Engine, loop: asyncio.AbstractEventLoop,
                 identity: tokens.TokenMetadata, models: JobModels, concurrency: int = 1, lease_s: float = 30.0,
                 poll_s: float = 0.2, on_sampled: Callable[[int, float], None] | None = None) -> None:
        self.store, self.generator, self.engine, self.loop = store, generator, engine, loop
        self.identity, self.models, self.concurrency = identity, models, concurrency
        self.lease_s, self.poll_s = lease_s, poll_s
        self.on_sampled = on_sampled or (lambda steps, seconds: None)
        self.stopping = engine.stopping
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # names this lane's leases
        self._queued = threading.Condition()  # notified when a job is queued; guards _running
        self._running: dict[str, _Running] = {}
        self._threads: list[threading.Thread] = []
        self._keeper: threading.Thread | None = None
        self._ended = threading.Event()  # the job threads have ended (the keeper ends with them)

    def start(self) -> int:
        """Take the queue and start the threads; how many jobs that a previous server left
        running went back to the queue (SQLite, whose jobs dir this server has locked)."""
        requeued = self.store.recover() if self.store.single_server else 0
        for i in range(self.concurrency):
            self._threads.append(threading.Thread(target=self._loop, name=f"coordtok-generate-{i}", daemon=True))
        self._keeper = threading.Thread(target=self._keep_leases, name="coordtok-leases", daemon=True)
        for thread in [*self._threads, self._keeper]:
            thread.start()
        return requeued

    def notify(self) -> None:
        """A job was queued."""
        with self._queued:
            self._queued.notify()

    def join(self, timeout_s: float = 60.0) -> bool:
        """Wait, up to `timeout_s`, for the threads to end once `stopping` is set: running jobs
        stop at their next step and go back to the queue. Whether they all ended."""
        with self._queued:
            self._queued.notify_all()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            return False
        self._ended.set()
        if self._keeper is not None:
            self._keeper.join()
        return True

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                job = self.store.claim(self.owner, self.models, self.lease_s)
                if job is not None:
                    self._run(job)
                    continue
            except Exception:  # the database is unreachable: the lease runs out, and the job is claimed again
                log.exception("the job store failed")
            with self._queued:
                if not self.stopping.is_set():
                    self._queued.wait(1.0)  # also picks up jobs queued by other servers, and leases that ran out

    def _keep_leases(self) -> None:
        """Renew the leases of the running jobs every third of `lease_s`; mark those not renewed lost."""
        while not self._ended.wait(self.lease_s / 3):
            with self._queued:
                running = set(self._running)
            if not running:
                continue
            try:
                held = self.store.renew(self.owner, self.lease_s)
            except Exception:
                log.exception("cannot renew the leases of running jobs")
                continue
            with self._queued:
                for job_id in running - held:
                    if job_id in self._running:
                        self._running[job_id].lost = True

    def _run(self, job: Job) -> None:
        log.info("job started", extra={"job_id": job.id, "attempt": job.attempts})
        run = _Running(job, cancelled=job.cancel_requested)
        with self._queued:
            self._running[job.id] = run
        try:
            self._check(run)
            self._generate(run)
        except _Stop:
            self.store.requeue(job.id, self.owner)
            log.info("job requeued (shutdown)", extra={"job_id": job.id})
            return
        except _LeaseLost:
            finished = None
        except _Cancelled:
            finished = self.store.finish(job.id, self.owner, "cancelled")
        except Exception as error:  # a failed job must not stop the lane
            log.exception("job failed", extra={"job_id": job.id})
            finished = self.store.finish(job.id, self.owner, "failed", f"{type(error).__name__}: {error}")
        else:
            finished = self.store.finish(job.id, self.owner, "succeeded")
        finally:
            with self._queued:
                del self._running[job.id]
        if finished is None:
            log.warning("job left to another server: this one's lease ran out", extra={"job_id": job.id})
        else:
            log.info("job finished", extra={"job_id": job.id, "status": finished.status})

    def _refresh(self, run: _Running) -> None:
        """Ask the store whether a cancel was requested, at most every `poll_s`."""
        now = time.monotonic()
        if not run.cancelled and now - run.polled_at >= self.poll_s:
            run.polled_at = now
            run.cancelled = self.store.cancel_requested(run.job.id)

    def _should_stop(self, run: _Running) -> bool:
        self._refresh(run)
        return run.lost or run.cancelled or self.stopping.is_set()

    def _check(self, run: _Running) -> None:
        """Raise _LeaseLost, _Cancelled or _Stop when the job is to end here."""
        self._refresh(run)
        if run.lost:
            raise _LeaseLost()
        if run.cancelled:
            raise _Cancelled()
        if self.stopping.is_set():
            raise _Stop()

    def _progress(self, run: _Running, step: int, videos_done: int) -> None:
        if not self.store.progress(run.job.id, self.owner, step, videos_done):
            run.lost = True

    def _generate(self, run: _Running) -> None:
        """Sample, decode and write every video of the job not yet written."""
        job, request = run.job, run.job.request
        done = {k for k in range(request.num_videos) if self.store.has_result(job, k)}
        self._progress(run, 0, len(done))
        for group in request.groups():
            missing = [k for k in group if k not in done]
            if not missing:
                continue
            triplanes = self._sample(run, group, len(done))
            for k in missing:
                self._check(run)
                one = triplanes[k - group.start]
                frames = None if request.format == "tokens" else self._decode(run, one)
                self.store.write_result(job, k, render(request, k, one, frames, self.identity))
                done.add(k)
                self._progress(run, request.steps, len(done))

    def _sample(self, run: _Running, group: range, videos_done: int) -> Triplane:
        """The triplanes of `group`, with progress written at most every `poll_s`."""
        self._check(run)
        last_write = 0.0

        def on_step(step: int, total: int) -> None:  # step 1..total done
            nonlocal last_write
            now = time.monotonic()
            if now - last_write >= self.poll_s or step == total:
                self._progress(run, step, videos_done)
                last_write = now

        started = time.perf_counter()
        try:
            triplanes = self.generator.sample(run.job.request, group, on_step, lambda: self._should_stop(run))
        except SamplingCancelled:
            self._check(run)
            raise
        self.on_sampled(run.job.request.steps, time.perf_counter() - started)
        return triplanes

    def _decode(self, run: _Running, triplane: Triplane) -> np.ndarray:
        """uint8 frames [T, H, W, 3] of one sampled clip, through the engine as a /v1/decode
        request goes: admitted (while the queue is full the lane waits, checking for cancel and
        stop), then queued and batched with requests."""
        clip = (0, self.engine.model_config.frames)
        while True:
            self._check(run)
            try:
                with self.engine.admit():
                    decoded = asyncio.run_coroutine_threadsafe(self.engine.decode(triplane, clip), self.loop)
                    return decoded.result()[0].numpy()
            except QueueFull:
                self.stopping.wait(ADMISSION_RETRY_S)
            except NotReady:
                if self.stopping.is_set():  # stopped between the check and the admission
                    raise _Stop() from None
                raise
