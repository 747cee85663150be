"""Generation jobs: the SQLite store, results on disk, and the generation lane.

POST /v1/generate writes a job row (`queued`). A lane thread claims the oldest queued job
(`running`), samples triplanes with the SiT generator a few videos at a time (progress written to
the row, cancellation checked at every sampling step), decodes each video with the tokenizer the
engine serves, writes it to disk, and marks the job `succeeded` (or `failed`, `cancelled`).

Storage: `jobs_dir/jobs.sqlite3` (stdlib sqlite3, WAL, one connection behind a lock; created with
the first job, so a server that never generates writes nothing) and
`jobs_dir/results/<job id>/<k>.<ext>`, each written to a temporary file and renamed into place.
One server process per jobs dir.

Restart: a job found `running` at start-up was interrupted (a crash, a kill): it goes back to
`queued` and runs again. Videos already on disk are kept and only the missing ones are generated.
That gives the same files as an uninterrupted run because video k depends only on (seed, k) and
the lane always samples the same groups of videos together: `[0, b)`, `[b, 2b)`, ... with `b`
the job's `batch_size`, fixed when the job is created. A group with any video missing is sampled
again whole, with the same shapes as the first time. A graceful stop (SIGTERM) puts the running
job back to `queued` at its next sampling step the same way.

Why the lane cannot starve encode and decode: it is its own thread(s) with its own concurrency
limit (`generation_concurrency` jobs at a time). Sampling runs on the generator's device between
the engine's batches (kernels of both interleave on a GPU; threads share the cores on a CPU), and
every decode of a generated video goes through the engine's queue as one clip of work, one video
at a time per running job, so it is batched with and waits behind requests like any other decode:
a request never waits behind more than `generation_concurrency` clips of generation work, and
the engine's back-pressure and device health apply to both.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError

from coordtok.formats import tokens
from coordtok.formats.video import FALLBACK_FPS, MAX_FPS, MIN_FPS, write_video
from coordtok.model import LatentStats, SiT, Triplane, generate_triplanes
from coordtok.model.checkpoint import DEFAULT_GENERATOR, file_sha256
from coordtok.model.clips import policy_for
from coordtok.model.checkpoint import load_generator as load_sit
from coordtok.model.config import CoordTokConfig
from coordtok.model.transport import SAMPLERS, SamplingCancelled

log = logging.getLogger("coordtok.jobs")

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
# Output format -> (file extension, media type).
RESULT_TYPES = {
    "mp4": ("mp4", "video/mp4"),
    "webm": ("webm", "video/webm"),
    "tokens": ("safetensors", tokens.FORMATS["safetensors"]),
}
_CODECS = {"mp4": "h264", "webm": "vp9"}


class GenerateRequest(BaseModel):
    """The body of POST /v1/generate. Limits that are settings (videos, steps) are checked by the
    route; these are the fixed ones."""

    model_config = ConfigDict(extra="forbid")

    num_videos: int = Field(1, ge=1, description="videos to generate")
    steps: int = Field(50, ge=1, description="sampling steps per video")
    sampler: Literal[SAMPLERS] = "euler"
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="absent: the server picks one and reports it")
    guidance: float = Field(1.0, ge=1.0, le=100.0, description="classifier-free guidance scale (1: none)")
    class_label: int | None = Field(None, ge=0, description="for a class-conditional generator")
    format: Literal["mp4", "webm", "tokens"] = "mp4"
    fps: float = Field(FALLBACK_FPS, ge=MIN_FPS, le=MAX_FPS, description="frame rate written into mp4/webm results")

    def fingerprint(self) -> str:
        """Identity of the request as sent, for Idempotency-Key (a seed the server picks is not part of it)."""
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()


class JobError(Exception):
    """A job request the server cannot serve; `http_status` says which."""

    http_status = 422


class JobNotFound(JobError):
    http_status = 404


class JobConflict(JobError):
    http_status = 409


class TooManyJobs(JobError):
    """The job queue is full; retry later."""

    http_status = 503


class GeneratorUnavailable(JobError):
    http_status = 503


def utc_iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Job:
    """One row of the store. `request` is the GenerateRequest with the seed filled in, plus
    `batch_size` (videos sampled together, fixed at creation)."""

    id: str
    seq: int
    status: str
    request: dict
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    videos_done: int = 0
    error: str | None = None
    cancel_requested: bool = False
    attempts: int = 0

    @property
    def num_videos(self) -> int:
        return self.request["num_videos"]

    def to_json(self) -> dict:
        """The job as the API shows it."""
        url = f"/v1/jobs/{self.id}"
        return {
            "id": self.id,
            "status": self.status,
            "url": url,
            "request": {k: v for k, v in self.request.items() if k != "batch_size"},
            "progress": {"videos_done": self.videos_done, "videos": self.num_videos,
                         "step": self.step, "steps": self.request["steps"]},
            "created_at": utc_iso(self.created_at),
            "started_at": utc_iso(self.started_at),
            "finished_at": utc_iso(self.finished_at),
            "error": self.error,
            "cancel_requested": self.cancel_requested,
            "attempts": self.attempts,
            "results": [f"{url}/results/{k}" for k in range(self.num_videos)] if self.status == "succeeded" else [],
        }


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    fingerprint TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    step INTEGER NOT NULL DEFAULT 0,
    videos_done INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
"""
_COLUMNS = "id, seq, status, request, created_at, started_at, finished_at, step, videos_done, error, cancel_requested, attempts"


class JobStore:
    """Jobs in SQLite and their results on disk under `root`. Thread-safe (one connection and a
    lock; every call is a short transaction). `on_transition(job)` is called with the job each
    time it enters a status (metrics)."""

    def __init__(self, root: str | Path, on_transition: Callable[[Job], None] | None = None) -> None:
        self.root = Path(root)
        self.path = self.root / "jobs.sqlite3"
        self.results = self.root / "results"
        self._on_transition = on_transition or (lambda job: None)
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None

    # ---- connection

    def _connect(self, create: bool) -> sqlite3.Connection | None:
        """The connection; None when there is no database yet and `create` is false."""
        if self._db is None:
            if not create and not self.path.exists():
                return None
            self.root.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across process crashes
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _rows(self, sql: str, args=()) -> list[Job]:
        with self._lock:
            db = self._connect(create=False)
            if db is None:
                return []
            return [_job(row) for row in db.execute(sql, args).fetchall()]

    def _entered(self, job_id: str) -> Job:
        job = self.require(job_id)
        self._on_transition(job)
        return job

    def _write(self, sql: str, args=()) -> int:
        """Run one statement in a transaction of its own; the number of rows it changed."""
        with self._lock:
            db = self._connect(create=False)
            return 0 if db is None else db.execute(sql, args).rowcount

    # ---- queries

    def get(self, job_id: str) -> Job | None:
        found = self._rows(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return found[0] if found else None

    def require(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} (unknown, deleted, or removed after the retention period)")
        return job

    def list(self, limit: int, cursor: int | None = None, status: str | None = None) -> tuple[list[Job], int | None]:
        """Newest first: up to `limit` jobs created before the job `cursor` (its seq), and the
        cursor of the next page (None on the last page)."""
        where, args = ["seq < ?"], [cursor if cursor is not None else 2**63 - 1]
        if status is not None:
            where.append("status = ?")
            args.append(status)
        jobs = self._rows(f"SELECT {_COLUMNS} FROM jobs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
                          (*args, limit + 1))
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return jobs, (jobs[-1].seq if more else None)

    def counts(self) -> dict[str, int]:
        with self._lock:
            db = self._connect(create=False)
            found = dict(db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()) if db else {}
        return {status: found.get(status, 0) for status in STATUSES}

    # ---- transitions

    def create(self, request: GenerateRequest, batch_size: int, max_active: int,
               idempotency_key: str | None = None) -> tuple[Job, bool]:
        """A new queued job for `request` -> (job, True); or, for an `idempotency_key` seen
        before with the same request, that job -> (job, False). The seed is picked here when absent."""
        fingerprint = request.fingerprint()
        with self._lock:
            db = self._connect(create=True)
            if idempotency_key is not None:
                row = db.execute(f"SELECT {_COLUMNS}, fingerprint FROM jobs WHERE idempotency_key = ?",
                                 (idempotency_key,)).fetchone()
                if row is not None:
                    if row[-1] != fingerprint:
                        raise JobError("this Idempotency-Key was used with a different request body; "
                                       "use a new key for a new request")
                    return _job(row[:-1]), False
            active = db.execute("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')").fetchone()[0]
            if active >= max_active:
                raise TooManyJobs(f"{active} jobs are queued or running (the limit is {max_active}); retry later")
            stored = {**request.model_dump(), "batch_size": batch_size}
            if stored["seed"] is None:
                stored["seed"] = secrets.randbelow(2**31)
            job_id = uuid.uuid4().hex
            now = time.time()
            db.execute("INSERT INTO jobs (id, status, request, idempotency_key, fingerprint, created_at) "
                       "VALUES (?, 'queued', ?, ?, ?, ?)", (job_id, json.dumps(stored), idempotency_key, fingerprint, now))
        return self._entered(job_id), True

    def claim(self) -> Job | None:
        """The oldest queued job, now running; None when none is queued."""
        with self._lock:
            db = self._connect(create=False)
            if db is None:
                return None
            row = db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, ?), step = 0, "
                       "attempts = attempts + 1 WHERE id = ?", (time.time(), row[0]))
        return self._entered(row[0])

    def progress(self, job_id: str, step: int, videos_done: int) -> None:
        self._write("UPDATE jobs SET step = ?, videos_done = ? WHERE id = ?", (step, videos_done, job_id))

    def finish(self, job_id: str, status: str, error: str | None = None) -> Job:
        """A running job -> succeeded, failed or cancelled. The results of a job that did not
        succeed are removed first, so that no one sees it finished with files left behind."""
        assert status in FINISHED
        if status != "succeeded":
            shutil.rmtree(self.results / job_id, ignore_errors=True)
        self._write("UPDATE jobs SET status = ?, finished_at = ?, error = ? WHERE id = ?", (status, time.time(), error, job_id))
        return self._entered(job_id)

    def requeue(self, job_id: str) -> None:
        """A running job goes back to the queue (shutdown); its finished videos stay."""
        if self._write("UPDATE jobs SET status = 'queued', step = 0 WHERE id = ? AND status = 'running'", (job_id,)):
            self._entered(job_id)

    def recover(self) -> int:
        """At start-up: jobs left running by a previous process go back to the queue (or to
        cancelled, when a cancel was asked for). Returns how many were requeued."""
        requeued = 0
        with self._lock:
            for job in self._rows(f"SELECT {_COLUMNS} FROM jobs WHERE status = 'running'"):
                if job.cancel_requested:
                    self._write("UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE id = ?", (time.time(), job.id))
                    shutil.rmtree(self.results / job.id, ignore_errors=True)
                else:
                    self._write("UPDATE jobs SET status = 'queued', step = 0 WHERE id = ?", (job.id,))
                    requeued += 1
                self._entered(job.id)
            self._remove_strays()
        return requeued

    def cancel(self, job_id: str) -> Job:
        """A queued job is cancelled at once; a running one is marked (the lane stops it at its
        next sampling step). Finished jobs: JobConflict."""
        with self._lock:
            job = self.require(job_id)
            if job.status == "queued":
                self._write("UPDATE jobs SET status = 'cancelled', finished_at = ?, cancel_requested = 1 WHERE id = ?",
                            (time.time(), job_id))
                shutil.rmtree(self.results / job_id, ignore_errors=True)  # videos of an interrupted run
                return self._entered(job_id)
            if job.status == "running":
                self._write("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                return self.require(job_id)
            raise JobConflict(f"job {job_id} is already {job.status}")

    def delete(self, job_id: str) -> None:
        """Remove a finished job and its results."""
        with self._lock:
            job = self.require(job_id)
            if job.status not in FINISHED:
                raise JobConflict(f"job {job_id} is {job.status}; cancel it first")
            self._write("DELETE FROM jobs WHERE id = ?", (job_id,))
        shutil.rmtree(self.results / job_id, ignore_errors=True)

    def sweep(self, older_than_s: float) -> int:
        """Remove finished jobs (rows and results) that finished more than `older_than_s` ago."""
        old = self._rows(f"SELECT {_COLUMNS} FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') "
                         "AND finished_at < ?", (time.time() - older_than_s,))
        for job in old:
            self._write("DELETE FROM jobs WHERE id = ?", (job.id,))
            shutil.rmtree(self.results / job.id, ignore_errors=True)
        return len(old)

    def _remove_strays(self) -> None:
        """Result folders without a job, and temporary files of interrupted writes."""
        if not self.results.is_dir():
            return
        for folder in self.results.iterdir():
            if self.get(folder.name) is None:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            for partial in folder.glob("*.tmp"):
                partial.unlink(missing_ok=True)

    # ---- results

    def result_path(self, job: Job, k: int) -> Path:
        extension, _ = RESULT_TYPES[job.request["format"]]
        return self.results / job.id / f"{k:04d}.{extension}"

    def write_result(self, job: Job, k: int, payload: bytes) -> None:
        """Write video k of `job` atomically (a temporary file, flushed, then renamed). A failed
        write (a full disk) leaves nothing behind and raises: the job fails, not the lane."""
        path = self.result_path(job, k)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".tmp")
        try:
            with open(partial, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


def _job(row) -> Job:
    (job_id, seq, status, request, created, started, finished, step, done, error, cancel, attempts) = row
    return Job(job_id, seq, status, json.loads(request), created, started, finished, step, done, error, bool(cancel), attempts)


# --------------------------------------------------------------------------------------------
# The generator


@dataclass
class Generator:
    """A loaded SiT generator, the latent statistics it was trained with, and its identity."""

    model: SiT
    stats: LatentStats
    model_id: str

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    def check(self, request: GenerateRequest) -> None:
        """Refuse (JobError, 422) what this generator cannot do."""
        if request.class_label is not None:
            if self.num_classes == 0:
                raise JobError("this generator is unconditional: leave class_label out")
            if request.class_label >= self.num_classes:
                raise JobError(f"class_label must lie in [0, {self.num_classes - 1}] for this generator")
        if request.guidance != 1.0 and request.class_label is None:
            raise JobError("guidance above 1 needs a class_label (and a class-conditional generator)")

    def sample(self, request: dict, first: int, count: int, on_step=None, should_stop=None) -> Triplane:
        """Triplanes of videos [first, first + count) of `request`, on CPU in float32. Video k
        depends only on (seed, k); `should_stop()` raises SamplingCancelled between steps."""
        triplane = generate_triplanes(
            self.model, self.stats, num=count, steps=request["steps"], sampler=request["sampler"],
            seed=request["seed"], guidance=request["guidance"], label=request["class_label"], first=first,
            on_step=on_step, should_stop=should_stop,
        )
        return triplane.to("cpu", torch.float32)


def load_generator(spec: str, tokenizer_sha256: str, tokenizer: CoordTokConfig,
                   device: str | torch.device) -> tuple[Generator | None, str]:
    """The generator of `spec` (a .safetensors path; empty: the bundled one; "none": no
    generator) for the tokenizer with weights `tokenizer_sha256` ('' for a random preset: not
    checked) and config `tokenizer` -> (Generator, ''), or (None, why not) when there is none or
    it does not fit."""
    if spec == "none":
        return None, "generation is turned off (the generator setting is 'none')"
    path = Path(spec) if spec else DEFAULT_GENERATOR
    if not path.is_file():
        return None, f"no generator file at {path}; set COORDTOK_GENERATOR to a generator .safetensors"
    try:
        model, metadata = load_sit(path, device=device, tokenizer_sha256=tokenizer_sha256 or None)
        stats = LatentStats.from_json(metadata["latent_stats"])
    except ValueError as error:
        return None, str(error)
    except SafetensorError as error:  # a damaged file: serve encode and decode without generation
        return None, f"the generator file {path} cannot be read ({error}); replace it"
    expected = (tokenizer.latent_res_xy, tokenizer.latent_res_t, tokenizer.latent_channels)
    c = model.config
    if (c.latent_res_xy, c.latent_res_t, c.latent_channels) != expected:
        return None, (f"{path} generates triplanes of (xy, t, channels) {(c.latent_res_xy, c.latent_res_t, c.latent_channels)}; "
                      f"the tokenizer's are {expected}")
    return Generator(model, stats, f"{path.stem}@{file_sha256(path)[:12]}"), ""


def render(request: dict, k: int, triplane: Triplane, frames: np.ndarray | None, identity: dict[str, str]) -> bytes:
    """The result file of video k: the decoded `frames` (uint8 [T, H, W, 3]) as mp4/webm, or
    its `triplane` (one clip) as a token file that /v1/decode accepts."""
    fmt = request["format"]
    if fmt == "tokens":
        meta = {**identity, "seed": str(request["seed"]), "index": str(k), "sampler": request["sampler"],
                "steps": str(request["steps"]), "guidance": f"{request['guidance']:g}", "fps": f"{request['fps']:g}"}
        if request["class_label"] is not None:
            meta["class_label"] = str(request["class_label"])
        return tokens.serialise(tokens.Tokens(triplane, meta), "safetensors")
    buffer = io.BytesIO()
    write_video(frames, buffer, request["fps"], codec=_CODECS[fmt])
    return buffer.getvalue()


def token_identity(config: CoordTokConfig, model_id: str, sha256: str, generator_id: str) -> dict[str, str]:
    """Metadata that generated token files carry, so that /v1/decode accepts them."""
    return {"model_id": model_id, "weights_sha256": sha256, "frames_per_clip": str(config.frames),
            "n_frames": json.dumps([config.frames]), "clip_starts": "[0]", "clip_policy": policy_for(config.reference_compat),
            "generator": generator_id}


def groups(num_videos: int, batch_size: int) -> list[range]:
    """The fixed groups of videos sampled together: [0, b), [b, 2b), ..."""
    return [range(a, min(a + batch_size, num_videos)) for a in range(0, num_videos, batch_size)]


# --------------------------------------------------------------------------------------------
# The lane


class _Stop(Exception):
    """The lane is stopping: the job goes back to the queue."""


class _Cancelled(Exception):
    """The job was cancelled."""


class GenerationLane:
    """`concurrency` threads, each running one job at a time from the store.

    `decode(triplane of one clip) -> uint8 [T, H, W, 3]` turns a sampled triplane into frames
    (the server routes it through the engine's queue). `on_sampled(steps, seconds)` is called
    after each group of videos is sampled (metrics).
    """

    def __init__(self, store: JobStore, generator: Generator, decode: Callable[[Triplane], np.ndarray],
                 identity: dict[str, str], concurrency: int = 1, progress_interval_s: float = 0.2,
                 on_sampled: Callable[[int, float], None] | None = None) -> None:
        self.store, self.generator, self.decode, self.identity = store, generator, decode, identity
        self.concurrency, self.progress_interval_s = concurrency, progress_interval_s
        self.on_sampled = on_sampled or (lambda steps, seconds: None)
        self._wake = threading.Condition()
        self._stopping = False
        self._cancelled: set[str] = set()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.concurrency):
            thread = threading.Thread(target=self._loop, name=f"coordtok-generate-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def notify(self) -> None:
        """A job was queued."""
        with self._wake:
            self._wake.notify()

    def cancel(self, job_id: str) -> None:
        """Stop the running job `job_id` at its next sampling step."""
        with self._wake:
            self._cancelled.add(job_id)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Take no more jobs; running ones stop at their next step and go back to the queue."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _loop(self) -> None:
        while True:
            with self._wake:
                if self._stopping:
                    return
            job = self.store.claim()
            if job is None:
                with self._wake:
                    if not self._stopping:
                        self._wake.wait(1.0)  # also picks up jobs queued by recovery
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
            with self._wake:
                self._cancelled.discard(job.id)
        log.info("job finished", extra={"job_id": job.id, "status": finished.status})

    def _check(self, job: Job) -> None:
        with self._wake:
            if job.id in self._cancelled:
                raise _Cancelled()
            if self._stopping:
                raise _Stop()

    def _generate(self, job: Job) -> None:
        request, n = job.request, job.num_videos
        done = {k for k in range(n) if self.store.result_path(job, k).exists()}
        self.store.progress(job.id, 0, len(done))
        for group in groups(n, request["batch_size"]):
            missing = [k for k in group if k not in done]
            if not missing:
                continue
            self._check(job)
            last_write = 0.0

            def on_step(step: int, total: int) -> None:  # step 1..total done
                nonlocal last_write
                now = time.monotonic()
                if now - last_write >= self.progress_interval_s or step == total:
                    self.store.progress(job.id, step, len(done))
                    last_write = now

            def should_stop() -> bool:
                with self._wake:
                    return job.id in self._cancelled or self._stopping

            started = time.perf_counter()
            try:
                triplanes = self.generator.sample(request, group.start, len(group), on_step, should_stop)
            except SamplingCancelled:
                self._check(job)
                raise
            self.on_sampled(request["steps"], time.perf_counter() - started)
            for k in missing:
                self._check(job)
                one = triplanes[k - group.start]
                frames = None if request["format"] == "tokens" else self.decode(one)
                self.store.write_result(job, k, render(request, k, one, frames, self.identity))
                done.add(k)
                self.store.progress(job.id, request["steps"], len(done))

