"""The job store: job rows in SQLite (`jobs_dir/jobs.sqlite3`, the default) or PostgreSQL
(`COORDTOK_JOBS_DB`), results as files. One code path, SQLAlchemy Core, serves both databases.

SQLite serves one server: the lane of the server that holds the jobs dir's lock
(ownership.py) runs its jobs; a server without a generator may still list them and serve their
results. The database is created with the first job, so a server that never generates writes
nothing. PostgreSQL serves several: every server's lane claims the oldest queued job that its
models can run with `SELECT ... FOR UPDATE SKIP LOCKED` (no two claim one job, none waits for
another), under a lease that the lane renews while it works. A job whose lease ran out (its
server died) is claimed again by another. Every change a lane makes to a job it runs is
conditional on still holding its lease, so a server that lost one changes nothing.

Results: video k of a job is `results_dir/<job id>/<k>.<ext>` (default `jobs_dir/results`; with
several servers, a folder they all mount), written to a temporary file and renamed into place, so
a file that exists is whole. A job claimed again keeps the videos on disk and generates only the
missing ones.

Recovery (SQLite, the lock held): a job found `running` at start-up was interrupted; `recover` puts
it back in the queue (or finishes it `cancelled`, when a cancel was asked for).

Idempotency: the database holds each Idempotency-Key once (a unique column); a job created with a
key is returned again for the same key and the same request body (its fingerprint), whichever
server gets it, and the same key with another body is refused.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from coordtok.service.jobs.job import FINISHED, STATUSES, Job, JobConflict, JobError, JobModels, JobNotFound, TooManyJobs
from coordtok.service.jobs.request import RESULT_TYPES, GenerateRequest, JobRequest
from coordtok.service.jobs.schema import ADMISSION_TURN, connect, create_schema, database_url, epoch_now, take_turns
from coordtok.service.jobs.schema import jobs as table

_COLUMNS = [table.c[name] for name in (
    "id", "seq", "status", "request", "created_at", "started_at", "finished_at", "step", "videos_done", "error",
    "cancel_requested", "attempts", "tokenizer_id", "tokenizer_sha256", "generator_id", "generator_sha256")]
_ACTIVE = ("queued", "running")


class JobStore:
    """Jobs in a database and their results on disk. Thread-safe (a pool of connections; every
    call is a short transaction). `jobs_dir` holds the SQLite database when `database` is empty,
    and the results unless `results_dir` is given. `on_transition(job)` is called with the job
    each time it enters a status (metrics)."""

    def __init__(self, jobs_dir: str | Path, on_transition: Callable[[Job], None] | None = None, *,
                 database: str = "", results_dir: str | Path | None = None) -> None:
        self.root = Path(jobs_dir)
        self.url = database_url(database, self.root)
        self.results = Path(results_dir) if results_dir is not None else self.root / "results"
        self._on_transition = on_transition or (lambda job: None)
        self._engine: Engine | None = None
        self._opening = threading.Lock()

    @property
    def single_server(self) -> bool:
        """SQLite: one server's lane per jobs dir (ownership.py); PostgreSQL: any number."""
        return self.url.get_backend_name() == "sqlite"

    @property
    def location(self) -> str:
        """Where the jobs are, for logs (no password)."""
        return self.url.render_as_string(hide_password=True)

    # ---- connection

    def _db(self, create: bool = False) -> Engine | None:
        """The engine; None when SQLite's file does not exist yet and `create` is false."""
        with self._opening:
            if self._engine is None:
                if self.single_server and not create and not Path(self.url.database).exists():
                    return None
                if self.single_server:
                    self.root.mkdir(parents=True, exist_ok=True)
                engine = connect(self.url)
                create_schema(engine)
                self._engine = engine
            return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def _jobs(self, query) -> list[Job]:
        db = self._db()
        if db is None:
            return []
        with db.connect() as connection:
            return [_job(row) for row in connection.execute(query)]

    def _change(self, statement) -> int:
        """Run one statement in a transaction of its own; the number of rows it changed."""
        db = self._db()
        if db is None:
            return 0
        with db.begin() as connection:
            return connection.execute(statement).rowcount

    def _entered(self, job_id: str) -> Job:
        job = self.require(job_id)
        self._on_transition(job)
        return job

    # ---- queries

    def get(self, job_id: str) -> Job | None:
        found = self._jobs(select(*_COLUMNS).where(table.c.id == job_id))
        return found[0] if found else None

    def require(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} (unknown, deleted, or removed after the retention period)")
        return job

    def list(self, limit: int, cursor: int | None = None, status: str | None = None) -> tuple[list[Job], int | None]:
        """Newest first: up to `limit` jobs created before the job `cursor` (its seq), and the
        cursor of the next page (None on the last page)."""
        query = select(*_COLUMNS).order_by(table.c.seq.desc()).limit(limit + 1)
        if cursor is not None:
            query = query.where(table.c.seq < cursor)
        if status is not None:
            query = query.where(table.c.status == status)
        jobs = self._jobs(query)
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return jobs, (jobs[-1].seq if more else None)

    def counts(self) -> dict[str, int]:
        db = self._db()
        found = {}
        if db is not None:
            with db.connect() as connection:
                found = dict(connection.execute(select(table.c.status, func.count()).group_by(table.c.status)).all())
        return {status: found.get(status, 0) for status in STATUSES}

    def cancel_requested(self, job_id: str) -> bool:
        with self._db().connect() as connection:
            return bool(connection.scalar(select(table.c.cancel_requested).where(table.c.id == job_id)))

    # ---- transitions

    def create(self, request: GenerateRequest, batch_size: int, max_active: int, models: JobModels,
               idempotency_key: str | None = None) -> tuple[Job, bool]:
        """A new queued job for `request`, to be made with `models` -> (job, True); or, for an
        `idempotency_key` seen before with the same request, that job -> (job, False). The seed is
        picked here when absent."""
        fingerprint = request.fingerprint()
        db = self._db(create=True)
        if idempotency_key is not None and (seen := self._by_key(idempotency_key, fingerprint)) is not None:
            return seen, False
        job_id = uuid.uuid4().hex
        try:
            with db.begin() as connection:
                take_turns(connection, ADMISSION_TURN)  # so that concurrent submits never pass the limit together
                active = connection.scalar(select(func.count()).where(table.c.status.in_(_ACTIVE)))
                if active >= max_active:
                    raise TooManyJobs(f"{active} jobs are queued or running (the limit is {max_active}); retry later")
                connection.execute(insert(table).values(
                    id=job_id, status="queued", request=JobRequest.of(request, batch_size).model_dump_json(),
                    idempotency_key=idempotency_key, fingerprint=fingerprint, created_at=time.time(),
                    tokenizer_id=models.tokenizer_id, tokenizer_sha256=models.tokenizer_sha256,
                    generator_id=models.generator_id, generator_sha256=models.generator_sha256))
        except IntegrityError:  # a concurrent submit with the same key made the job first
            if idempotency_key is None or (seen := self._by_key(idempotency_key, fingerprint)) is None:
                raise
            return seen, False
        return self._entered(job_id), True

    def _by_key(self, idempotency_key: str, fingerprint: str) -> Job | None:
        with self._db().connect() as connection:
            row = connection.execute(select(*_COLUMNS, table.c.fingerprint)
                                     .where(table.c.idempotency_key == idempotency_key)).first()
        if row is None:
            return None
        if row.fingerprint != fingerprint:
            raise JobError("this Idempotency-Key was used with a different request body; use a new key for a new request")
        return _job(row)

    def claim(self, owner: str, models: JobModels, lease_s: float) -> Job | None:
        """The oldest job that a server with `models` runs and no server holds (queued, or running
        under a lease that ran out), now running under `owner`'s lease of `lease_s` seconds;
        None when there is none. Concurrent claims skip each other's rows (SKIP LOCKED)."""
        runnable = (table.c.tokenizer_sha256.is_(None) | ((table.c.tokenizer_sha256 == models.tokenizer_sha256)
                                                         & (table.c.generator_sha256 == models.generator_sha256)))
        free = (table.c.status == "queued") | ((table.c.status == "running") & (table.c.lease_until < epoch_now()))
        oldest = (select(table.c.id).where(free & runnable).order_by(table.c.seq).limit(1)
                  .with_for_update(skip_locked=True).scalar_subquery())
        claimed = (update(table).where(table.c.id == oldest)
                   .values(status="running", started_at=func.coalesce(table.c.started_at, time.time()), step=0,
                           attempts=table.c.attempts + 1, lease_owner=owner, lease_until=epoch_now() + lease_s)
                   .returning(table.c.id))
        db = self._db()
        if db is None:
            return None
        with db.begin() as connection:
            job_id = connection.scalar(claimed)
        return None if job_id is None else self._entered(job_id)

    def renew(self, owner: str, lease_s: float) -> set[str]:
        """Extend the leases of every job `owner` runs by `lease_s` seconds from now; their ids."""
        renewed = (update(table).where((table.c.lease_owner == owner) & (table.c.status == "running"))
                   .values(lease_until=epoch_now() + lease_s).returning(table.c.id))
        with self._db().begin() as connection:
            return set(connection.scalars(renewed))

    def progress(self, job_id: str, owner: str, step: int, videos_done: int) -> bool:
        """Record the progress of a job `owner` runs; False when it no longer holds the lease."""
        return self._change(update(table).where(_leased(job_id, owner)).values(step=step, videos_done=videos_done)) == 1

    def finish(self, job_id: str, owner: str, status: str, error: str | None = None) -> Job | None:
        """A running job of `owner` -> succeeded, failed or cancelled; None (and nothing changed)
        when `owner` no longer holds its lease. The results of a job that did not succeed are
        removed first, so that no one sees it finished with files left behind."""
        assert status in FINISHED
        if status != "succeeded":
            if not self._holds(job_id, owner):
                return None
            shutil.rmtree(self.results / job_id, ignore_errors=True)
        finished = update(table).where(_leased(job_id, owner)).values(
            status=status, finished_at=time.time(), error=error, lease_owner=None, lease_until=None)
        return self._entered(job_id) if self._change(finished) else None

    def _holds(self, job_id: str, owner: str) -> bool:
        with self._db().connect() as connection:
            return connection.scalar(select(func.count()).where(_leased(job_id, owner))) == 1

    def requeue(self, job_id: str, owner: str) -> None:
        """A running job of `owner` goes back to the queue (shutdown); its finished videos stay."""
        if self._change(update(table).where(_leased(job_id, owner))
                        .values(status="queued", step=0, lease_owner=None, lease_until=None)):
            self._entered(job_id)

    def recover(self) -> int:
        """At start-up of a server that holds the jobs dir (SQLite): jobs left running by a
        previous process go back to the queue (or to cancelled, when a cancel was asked for), and
        result files of removed jobs and of interrupted writes are removed. How many were requeued."""
        requeued = 0
        for job in self._jobs(select(*_COLUMNS).where(table.c.status == "running")):
            if job.cancel_requested:
                self._change(update(table).where(table.c.id == job.id)
                             .values(status="cancelled", finished_at=time.time(), lease_owner=None, lease_until=None))
                shutil.rmtree(self.results / job.id, ignore_errors=True)
            else:
                self._change(update(table).where(table.c.id == job.id)
                             .values(status="queued", step=0, lease_owner=None, lease_until=None))
                requeued += 1
            self._entered(job.id)
        self._remove_strays()
        return requeued

    def cancel(self, job_id: str) -> Job:
        """A queued job is cancelled at once; a running one is marked, and the lane that runs it,
        on whichever server, stops it at its next sampling step. Finished jobs: JobConflict."""
        queued = update(table).where((table.c.id == job_id) & (table.c.status == "queued")).values(
            status="cancelled", finished_at=time.time(), cancel_requested=True)
        if self._change(queued):
            shutil.rmtree(self.results / job_id, ignore_errors=True)  # videos of an interrupted run
            return self._entered(job_id)
        if self._change(update(table).where((table.c.id == job_id) & (table.c.status == "running"))
                        .values(cancel_requested=True)):
            return self.require(job_id)
        raise JobConflict(f"job {job_id} is already {self.require(job_id).status}")

    def delete(self, job_id: str) -> None:
        """Remove a finished job and its results."""
        if not self._change(delete(table).where((table.c.id == job_id) & table.c.status.in_(FINISHED))):
            raise JobConflict(f"job {job_id} is {self.require(job_id).status}; cancel it first")
        shutil.rmtree(self.results / job_id, ignore_errors=True)

    def sweep(self, older_than_s: float) -> int:
        """Remove finished jobs (rows and results) that finished more than `older_than_s` ago."""
        old = self._jobs(select(*_COLUMNS).where(table.c.status.in_(FINISHED)
                                                 & (table.c.finished_at < time.time() - older_than_s)))
        for job in old:
            self._change(delete(table).where(table.c.id == job.id))
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
        """Write video k of `job` atomically (a temporary file of this writer's own, flushed, then
        renamed). A failed write (a full disk) leaves nothing behind and raises: the job fails, not
        the lane."""
        path = self.result_path(job, k)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(partial, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


def _leased(job_id: str, owner: str):
    """The condition of a change by the lane `owner` to a job it runs: it still holds the lease."""
    return (table.c.id == job_id) & (table.c.lease_owner == owner) & (table.c.status == "running")


def _job(row) -> Job:
    models = None
    if row.tokenizer_sha256 is not None:
        models = JobModels(row.tokenizer_id, row.tokenizer_sha256, row.generator_id, row.generator_sha256)
    return Job(row.id, row.seq, row.status, JobRequest.model_validate_json(row.request), row.created_at, row.started_at,
               row.finished_at, row.step, row.videos_done, row.error, bool(row.cancel_requested), row.attempts, models)
