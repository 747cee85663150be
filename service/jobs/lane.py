"""The generation lane: the threads that run jobs.

A lane thread claims the oldest queued job (`running`), samples triplanes with the SiT generator a
group of videos at a time (progress written to the job, cancellation checked at every sampling
step), decodes each video with the tokenizer the engine serves, writes its file, and marks the job
`succeeded` (or `failed`, `cancelled`).

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
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np

from coordtok.formats import tokens
from coordtok.formats.video import video_bytes
from coordtok.model import Triplane
from coordtok.model.clips import policy_for
from coordtok.model.config import CoordTokConfig
from coordtok.model.transport import SamplingCancelled
from coordtok.service.engine import Engine, NotReady, QueueFull
from coordtok.service.jobs.generator import Generator
from coordtok.service.jobs.job import Job
from coordtok.service.jobs.request import JobRequest

log = logging.getLogger("coordtok.jobs")

ADMISSION_RETRY_S = 0.05  # the lane's pause before asking again for a place in a full engine queue


class JobQueue(Protocol):
    """What the lane needs of a job store (`JobStore`: SQLite; another store can stand in its place)."""

    def claim(self) -> Job | None: ...

    def progress(self, job_id: str, step: int, videos_done: int) -> None: ...

    def finish(self, job_id: str, status: str, error: str | None = None) -> Job: ...

    def requeue(self, job_id: str) -> None: ...

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


class GenerationLane:
    """`concurrency` threads, each running one job at a time from `store`. Decodes go through
    `engine`, whose requests are served on the event loop `loop`; the lane stops with the engine's
    `stopping` signal. `on_sampled(steps, seconds)` is called after each group of videos is
    sampled (metrics)."""

    def __init__(self, store: JobQueue, generator: Generator, engine: Engine, loop: asyncio.AbstractEventLoop,
                 identity: tokens.TokenMetadata, concurrency: int = 1, progress_interval_s: float = 0.2,
                 on_sampled: Callable[[int, float], None] | None = None) -> None:
        self.store, self.generator, self.engine, self.loop = store, generator, engine, loop
        self.identity, self.concurrency, self.progress_interval_s = identity, concurrency, progress_interval_s
        self.on_sampled = on_sampled or (lambda steps, seconds: None)
        self.stopping = engine.stopping
        self._queued = threading.Condition()  # notified when a job is queued
        self._cancelled: set[str] = set()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.concurrency):
            thread = threading.Thread(target=self._loop, name=f"coordtok-generate-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def notify(self) -> None:
        """A job was queued."""
        with self._queued:
            self._queued.notify()

    def cancel(self, job_id: str) -> None:
        """Stop the running job `job_id` at its next sampling step."""
        with self._queued:
            self._cancelled.add(job_id)

    def join(self, timeout_s: float = 60.0) -> None:
        """Wait, up to `timeout_s`, for the threads to end once `stopping` is set: running jobs
        stop at their next step and go back to the queue."""
        with self._queued:
            self._queued.notify_all()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _loop(self) -> None:
        while not self.stopping.is_set():
            job = self.store.claim()
            if job is None:
                with self._queued:
                    if not self.stopping.is_set():
                        self._queued.wait(1.0)  # also picks up jobs queued by recovery
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        log.info("job started", extra={"job_id": job.id, "attempt": job.attempts})
        try:
            if job.cancel_requested:
                raise _Cancelled()
            self._generate(job)
        except _Stop:
            self.store.requeue(job.id)
            log.info("job requeued (shutdown)", extra={"job_id": job.id})
            return
        except _Cancelled:
            finished = self.store.finish(job.id, "cancelled")
        except Exception as error:  # a failed job must not stop the lane
            log.exception("job failed", extra={"job_id": job.id})
            finished = self.store.finish(job.id, "failed", f"{type(error).__name__}: {error}")
        else:
            finished = self.store.finish(job.id, "succeeded")
        finally:
            with self._queued:
                self._cancelled.discard(job.id)
        log.info("job finished", extra={"job_id": job.id, "status": finished.status})

    def _should_stop(self, job: Job) -> bool:
        with self._queued:
            return job.id in self._cancelled or self.stopping.is_set()

    def _check(self, job: Job) -> None:
        """Raise _Cancelled or _Stop when the job is to end here."""
        with self._queued:
            if job.id in self._cancelled:
                raise _Cancelled()
        if self.stopping.is_set():
            raise _Stop()

    def _generate(self, job: Job) -> None:
        """Sample, decode and write every video of `job` not yet written."""
        request = job.request
        done = {k for k in range(request.num_videos) if self.store.has_result(job, k)}
        self.store.progress(job.id, 0, len(done))
        for group in request.groups():
            missing = [k for k in group if k not in done]
            if not missing:
                continue
            triplanes = self._sample(job, group, len(done))
            for k in missing:
                self._check(job)
                one = triplanes[k - group.start]
                frames = None if request.format == "tokens" else self._decode(job, one)
                self.store.write_result(job, k, render(request, k, one, frames, self.identity))
                done.add(k)
                self.store.progress(job.id, request.steps, len(done))

    def _sample(self, job: Job, group: range, videos_done: int) -> Triplane:
        """The triplanes of `group`, with progress written at most every `progress_interval_s`."""
        self._check(job)
        last_write = 0.0

        def on_step(step: int, total: int) -> None:  # step 1..total done
            nonlocal last_write
            now = time.monotonic()
            if now - last_write >= self.progress_interval_s or step == total:
                self.store.progress(job.id, step, videos_done)
                last_write = now

        started = time.perf_counter()
        try:
            triplanes = self.generator.sample(job.request, group, on_step, lambda: self._should_stop(job))
        except SamplingCancelled:
            self._check(job)
            raise
        self.on_sampled(job.request.steps, time.perf_counter() - started)
        return triplanes

    def _decode(self, job: Job, triplane: Triplane) -> np.ndarray:
        """uint8 frames [T, H, W, 3] of one sampled clip, through the engine as a /v1/decode
        request goes: admitted (while the queue is full the lane waits, checking for cancel and
        stop), then queued and batched with requests."""
        clip = (0, self.engine.model_config.frames)
        while True:
            self._check(job)
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
