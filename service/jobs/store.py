"""The SQLite job store: job rows in `jobs_dir/jobs.sqlite3`, results on disk.

Storage: stdlib sqlite3, WAL, one connection behind a lock; the database is created with the first
job, so a server that never generates writes nothing. Video k of a job is
`jobs_dir/results/<job id>/<k>.<ext>`, written to a temporary file and renamed into place. One
server process per jobs dir.

Recovery: a job found `running` at start-up was interrupted (a crash, a kill): `recover` puts it
back in the queue (or finishes it `cancelled`, when a cancel was asked for); its videos on disk are
kept, so that the lane generates only the missing ones.

Idempotency: a job created with an Idempotency-Key is returned again for the same key and the same
request body (its fingerprint); the same key with another body is refused.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from coordtok.service.jobs.job import FINISHED, STATUSES, Job, JobConflict, JobError, JobNotFound, TooManyJobs
from coordtok.service.jobs.request import RESULT_TYPES, GenerateRequest, JobRequest


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
            stored = JobRequest.of(request, batch_size).model_dump_json()
            job_id = uuid.uuid4().hex
            now = time.time()
            db.execute("INSERT INTO jobs (id, status, request, idempotency_key, fingerprint, created_at) "
                       "VALUES (?, 'queued', ?, ?, ?, ?)", (job_id, stored, idempotency_key, fingerprint, now))
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
        extension, _ = RESULT_TYPES[job.request.format]
        return self.results / job.id / f"{k:04d}.{extension}"

    def has_result(self, job: Job, k: int) -> bool:
        return self.result_path(job, k).is_file()

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
    return Job(job_id, seq, status, JobRequest.model_validate_json(request), created, started, finished, step, done, error, bool(cancel), attempts)
