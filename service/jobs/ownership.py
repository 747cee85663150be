"""One server's lane per jobs dir (SQLite): an exclusive lock on `jobs_dir/lane.lock`.

A server that will run jobs from the dir takes the lock (`fcntl.flock`, which the kernel releases
when the process ends, however it ends) before it loads its models (service/runtime.py), so before
its lane recovers or runs any job, and writes into the file who holds it: pid, host and the
address it serves. A second server with a generator on a held jobs dir does not
start: `JobsDirBusy` says which server holds it and what to do instead. flock holds between the
processes of one machine; servers on several machines share a queue through PostgreSQL instead.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from coordtok.service.jobs.job import utc_iso

LOCK_FILE = "lane.lock"


class JobsDirBusy(Exception):
    """Another server's lane holds the jobs dir."""


class JobsDirLock:
    """The lock on a jobs dir, held from `take` until `release` (or the end of the process)."""

    def __init__(self, path: Path, file) -> None:
        self.path, self._file = path, file

    @classmethod
    def take(cls, jobs_dir: Path, address: str | None) -> JobsDirLock:
        """Lock `jobs_dir` for this process, recording it as serving `address` (host:port; None:
        an app run in this process, such as `coordtok generate`'s). JobsDirBusy when another holds it."""
        jobs_dir.mkdir(parents=True, exist_ok=True)
        path = jobs_dir / LOCK_FILE
        file = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read()
            file.close()
            raise JobsDirBusy(_busy_message(jobs_dir, holder)) from None
        file.seek(0)
        file.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "address": address, "since": time.time()}, file)
        file.flush()
        return cls(path, file)

    def release(self) -> None:
        """Unlock (the file stays: removing it would let two servers lock two different files)."""
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def _busy_message(jobs_dir: Path, holder: str) -> str:
    try:
        record = json.loads(holder)
        who = (f"the coordtok server with pid {record['pid']} on {record['host']}, serving "
               f"{record['address'] or 'in its own process'} since {utc_iso(record['since'])}")
    except (ValueError, KeyError, TypeError):  # written by a process still starting, or damaged
        who = "another coordtok server"
    return (f"the jobs dir {jobs_dir} is held by {who}: stop it, give this server another COORDTOK_JOBS_DIR, "
            "set COORDTOK_GENERATOR=none to serve only encode and decode, or share one queue among servers "
            "with COORDTOK_JOBS_DB=postgresql://...")
