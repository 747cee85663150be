"""The job table, in SQLAlchemy Core, for both databases a job store uses: SQLite (a file in the
jobs dir, the embedded default) and PostgreSQL (`COORDTOK_JOBS_DB=postgresql://...`, one queue for
several servers).

Leases are timed by the database's clock (`epoch_now`), so that servers whose clocks disagree
still agree on when a lease has run out.
"""
from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path

from sqlalchemy import (BigInteger, Boolean, Column, Float, Index, Integer, MetaData, String, Table, Text, create_engine,
                        event, false, inspect, text)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

metadata = MetaData()

jobs = Table(
    "jobs", metadata,
    # SQLite's AUTOINCREMENT (never reusing the seq of a deleted job) needs the type INTEGER.
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("id", String(32), nullable=False, unique=True),
    Column("status", String(16), nullable=False),
    Column("request", Text, nullable=False),  # JobRequest as JSON
    Column("idempotency_key", Text, unique=True),
    Column("fingerprint", String(64)),  # of the request as sent with the key
    Column("created_at", Float, nullable=False),  # Unix seconds, the servers' clocks
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("step", Integer, nullable=False, server_default="0"),
    Column("videos_done", Integer, nullable=False, server_default="0"),
    Column("error", Text),
    Column("cancel_requested", Boolean, nullable=False, server_default=false()),
    Column("attempts", Integer, nullable=False, server_default="0"),
    # The models the job is made with (JobModels); NULL in rows of servers before they were recorded.
    Column("tokenizer_id", Text),
    Column("tokenizer_sha256", String(64)),
    Column("generator_id", Text),
    Column("generator_sha256", String(64)),
    # The server running the job, until when (Unix seconds, the database's clock).
    Column("lease_owner", Text),
    Column("lease_until", Float),
    Index("jobs_by_status", "status", "seq"),
    sqlite_autoincrement=True,
)


class epoch_now(FunctionElement):
    """The database's clock in Unix seconds."""

    type = Float()
    inherit_cache = True


@compiles(epoch_now, "postgresql")
def _epoch_now_postgresql(element, compiler, **kw) -> str:
    return "EXTRACT(EPOCH FROM CLOCK_TIMESTAMP())"


@compiles(epoch_now, "sqlite")
def _epoch_now_sqlite(element, compiler, **kw) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


_EXPECTED = "a postgresql://user:password@host/database URL (or empty for SQLite in the jobs dir)"


def database_url(setting: str, jobs_dir: Path) -> URL:
    """The database of the `jobs_db` setting: empty, SQLite in `jobs_dir`; postgresql://... (or
    postgres://...), that PostgreSQL database through psycopg 3. ValueError for anything else."""
    if not setting:
        return URL.create("sqlite", database=str(Path(jobs_dir) / "jobs.sqlite3"))
    try:
        url = make_url(setting)
    except ArgumentError:
        raise ValueError(f"COORDTOK_JOBS_DB must be {_EXPECTED}") from None
    if url.drivername == "postgres":  # the scheme some hosting services write
        url = url.set(drivername="postgresql")
    if url.get_backend_name() != "postgresql" or url.get_driver_name() not in ("psycopg", "psycopg2"):
        raise ValueError(f"COORDTOK_JOBS_DB must be {_EXPECTED}, not {url.render_as_string(hide_password=True)}")
    return url.set(drivername="postgresql+psycopg")


SQLITE_BUSY_WAIT_S = 10.0


def connect(url: URL) -> Engine:
    """An engine for `url`. SQLite: WAL (readers do not wait for the writer), durable across
    process crashes, a 10 s wait for a busy database; PostgreSQL: connections checked before use,
    so that a database restart costs no failed job."""
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_WAIT_S, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(connection, _record) -> None:
            _use_wal(connection)
            connection.execute("PRAGMA synchronous=NORMAL")

        return engine
    return create_engine(url, pool_pre_ping=True)


def _use_wal(connection: sqlite3.Connection) -> None:
    """Switch the database file to WAL (it stays so), waiting up to SQLITE_BUSY_WAIT_S while it is
    busy. The switch from rollback mode needs the exclusive lock; where waiting for it could
    deadlock (another connection, opening the new file too, holds or wants the write lock),
    SQLite fails at once without calling the busy handler, so this waits and tries again."""
    deadline = time.monotonic() + SQLITE_BUSY_WAIT_S
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.005, 0.05))


# PostgreSQL advisory lock keys: any constants that every server shares.
SCHEMA_TURN = 7110617  # creating or upgrading the table
ADMISSION_TURN = 7110618  # counting the active jobs and adding one


def take_turns(db: Connection, turn: int) -> None:
    """Make the transaction just begun on `db` wait for, then hold off until it ends, every other
    transaction that takes the same `turn`: PostgreSQL's advisory lock `turn`; SQLite's write lock
    (BEGIN IMMEDIATE: pysqlite begins no transaction before a read or DDL by itself), one for all turns."""
    if db.dialect.name == "sqlite":
        db.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        db.execute(text("SELECT pg_advisory_xact_lock(:turn)"), {"turn": turn})


def create_schema(engine: Engine) -> None:
    """Create the job table, or add the columns that a table made by an older server lacks (all of
    them nullable). Stores opening one database together take turns (SQLite: the write lock;
    PostgreSQL: an advisory lock), since two concurrent CREATE TABLE IF NOT EXISTS can collide."""
    with engine.begin() as db:
        take_turns(db, SCHEMA_TURN)
        metadata.create_all(db, checkfirst=True)
        have = {column["name"] for column in inspect(db).get_columns("jobs")}
        for column in jobs.columns:
            if column.name not in have:
                db.execute(text(f"ALTER TABLE jobs ADD COLUMN {column.name} {column.type.compile(engine.dialect)}"))
