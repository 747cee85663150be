"""The job store on both of its databases, SQLite and a real PostgreSQL (a private cluster): claims
under leases, taking over a job whose lease ran out, the models a job needs, one job per
Idempotency-Key under concurrent submits, cancels seen across stores. Each store object stands for
a server (its own connection pool)."""
import json
import sqlite3
import threading
import time
import uuid

import pytest

from coordtok.service.jobs import GenerateRequest, JobError, JobModels, JobStore, TooManyJobs
from tests.service.postgres_cluster import fresh_database, private_cluster

MODELS = JobModels("tokenizer@aaaa", "a" * 64, "generator@bbbb", "b" * 64)
OTHER = JobModels("tokenizer@cccc", "c" * 64, "generator@bbbb", "b" * 64)


@pytest.fixture(scope="module")
def cluster():
    with private_cluster() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def stores(request, tmp_path):
    """A function making a new store (a new server's) on one database: SQLite in tmp_path, or a
    fresh PostgreSQL database."""
    database = ""
    if request.param == "postgresql":
        database = fresh_database(request.getfixturevalue("cluster"), f"jobs_{uuid.uuid4().hex[:8]}")
    made = []

    def new_store() -> JobStore:
        made.append(JobStore(tmp_path, database=database))
        return made[-1]

    yield new_store
    for store in made:
        store.close()


def submit(store: JobStore, n: int = 1, models: JobModels = MODELS) -> list[str]:
    return [store.create(GenerateRequest(num_videos=1, steps=1), 1, 100, models)[0].id for _ in range(n)]


def in_threads(action, n: int) -> list:
    """Run `action(i)` in `n` threads started together; their results."""
    results, start = [None] * n, threading.Barrier(n)

    def run(i: int) -> None:
        start.wait()
        results[i] = action(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_concurrent_claims_take_every_job_exactly_once(stores):
    ids = submit(stores(), 8)
    servers = [stores() for _ in range(4)]

    def claim_all(i: int) -> list[str]:
        claimed = []
        while (job := servers[i].claim(f"server-{i}", MODELS, lease_s=30)) is not None:
            claimed.append(job.id)
        return claimed

    claimed = [job_id for ids_of_one in in_threads(claim_all, 4) for job_id in ids_of_one]
    assert sorted(claimed) == sorted(ids)
    assert all(job.attempts == 1 and job.status == "running" for job in map(servers[0].get, ids))


def test_a_renewed_lease_holds_and_one_that_ran_out_passes_to_another_server(stores):
    first, second = stores(), stores()
    (job_id,) = submit(first)
    assert first.claim("first", MODELS, lease_s=1.0).id == job_id
    for _ in range(4):  # 1.2 s renewed every 0.3 s: never free
        time.sleep(0.3)
        assert first.renew("first", lease_s=1.0) == {job_id}
        assert second.claim("second", MODELS, lease_s=1.0) is None
    time.sleep(1.2)  # the first server "died": its lease runs out
    taken = second.claim("second", MODELS, lease_s=30)
    assert taken.id == job_id and taken.attempts == 2
    # The first server, back, changes nothing: its progress, finish and requeue are refused.
    assert first.renew("first", lease_s=1.0) == set()
    assert not first.progress(job_id, "first", 5, 1)
    assert first.finish(job_id, "first", "failed", "late") is None
    first.requeue(job_id, "first")
    assert first.get(job_id).status == "running" and first.get(job_id).error is None
    assert second.progress(job_id, "second", 1, 0)
    assert second.finish(job_id, "second", "succeeded").status == "succeeded"
    assert second.finish(job_id, "second", "succeeded") is None  # finished once


def test_only_a_server_with_the_jobs_models_claims_it_and_others_say_why(stores):
    store = stores()
    (job_id,) = submit(store, models=OTHER)
    assert store.claim("server", MODELS, lease_s=30) is None
    listed = store.get(job_id).to_json(MODELS)
    assert listed["status"] == "queued" and listed["models"]["tokenizer"] == {"id": "tokenizer@cccc", "weights_sha256": "c" * 64}
    assert listed["waiting_for"] == ("a server with tokenizer tokenizer@cccc and generator generator@bbbb "
                                     "(this server runs tokenizer tokenizer@aaaa and generator generator@bbbb)")
    assert "this server has no generator" in store.get(job_id).to_json(None)["waiting_for"]
    assert store.get(job_id).to_json(OTHER)["waiting_for"] is None
    assert store.claim("server", OTHER, lease_s=30).id == job_id


def test_concurrent_submits_with_one_idempotency_key_make_one_job(stores):
    servers = [stores() for _ in range(8)]
    body = GenerateRequest(num_videos=2, steps=3)
    made = in_threads(lambda i: servers[i].create(body, 1, 100, MODELS, idempotency_key="order-7"), 8)
    assert len({job.id for job, _ in made}) == 1
    assert sorted(created for _, created in made) == [False] * 7 + [True]
    assert len({job.request.seed for job, _ in made}) == 1  # the seed the first submit picked
    assert sum(servers[0].counts().values()) == 1
    with pytest.raises(JobError, match="Idempotency-Key"):
        servers[1].create(GenerateRequest(num_videos=3), 1, 100, MODELS, idempotency_key="order-7")


def test_concurrent_submits_to_four_servers_never_exceed_the_queue_limit(stores):
    """12 submits at once, 4 servers, a limit of 5 active jobs: 5 are made, 7 refused with the limit."""
    servers = [stores() for _ in range(4)]

    def create(i: int):
        try:
            return servers[i % 4].create(GenerateRequest(num_videos=1, steps=1), 1, 5, MODELS)[0].id
        except TooManyJobs as error:
            return str(error)

    answers = in_threads(create, 12)
    refused = [answer for answer in answers if "the limit is 5" in answer]
    assert (len(answers) - len(refused), len(refused)) == (5, 7), answers
    assert servers[0].counts()["queued"] == 5


def test_a_cancel_sent_to_one_server_reaches_the_server_running_the_job(stores):
    running, other = stores(), stores()
    queued_id, running_id = submit(running, 2)[::-1]
    assert running.claim("runner", MODELS, lease_s=30).id == running_id
    assert not running.cancel_requested(running_id)
    assert other.cancel(running_id).cancel_requested and other.get(running_id).status == "running"
    assert running.cancel_requested(running_id)
    assert other.cancel(queued_id).status == "cancelled"
    assert running.finish(running_id, "runner", "cancelled").status == "cancelled"


def test_a_database_of_an_older_server_gains_the_new_columns_and_its_jobs_run(tmp_path):
    """A jobs.sqlite3 made before jobs recorded models and leases: opened, it gets the columns;
    its queued job (no models recorded) runs on any server."""
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        db.executescript("CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
                         "status TEXT NOT NULL, request TEXT NOT NULL, idempotency_key TEXT UNIQUE, fingerprint TEXT, "
                         "created_at REAL NOT NULL, started_at REAL, finished_at REAL, step INTEGER NOT NULL DEFAULT 0, "
                         "videos_done INTEGER NOT NULL DEFAULT 0, error TEXT, cancel_requested INTEGER NOT NULL DEFAULT 0, "
                         "attempts INTEGER NOT NULL DEFAULT 0)")
        request = GenerateRequest(num_videos=1).model_dump() | {"seed": 1, "batch_size": 1}
        db.execute("INSERT INTO jobs (id, status, request, created_at) VALUES ('old', 'queued', ?, 1.0)",
                   (json.dumps(request),))
    store = JobStore(tmp_path)
    assert store.get("old").models is None and store.get("old").to_json(MODELS)["waiting_for"] is None
    assert store.claim("server", MODELS, lease_s=30).id == "old"
    store.close()


def test_a_store_opening_a_new_sqlite_file_while_another_holds_the_write_lock_waits(tmp_path):
    """The first connection turns the file to WAL, which SQLite refuses at once (no busy wait) while
    another connection holds the write lock: two servers creating the file together. The store waits
    for the lock to go and opens the database; before, it failed with "database is locked"."""
    holder = sqlite3.connect(tmp_path / "jobs.sqlite3", isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE other (x)")
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, holder.execute, ("COMMIT",))
    release.start()
    store = JobStore(tmp_path)
    try:
        assert sum(store.counts().values()) == 0  # opening the file waited for the lock
        (job_id,) = submit(store)
        assert store.get(job_id).status == "queued"
        with sqlite3.connect(tmp_path / "jobs.sqlite3") as check:
            assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        release.join()
        store.close()
        holder.close()
