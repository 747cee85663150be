"""A generation job as every store keeps it and as the API shows it; the errors of job requests."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from coordtok.service.jobs.request import JobRequest

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")


class JobError(Exception):
    """A job request the server cannot serve (the status each error answers with: service/errors.py)."""


class JobNotFound(JobError):
    """No such job or result."""


class JobConflict(JobError):
    """The job is not in a status that allows this."""


class TooManyJobs(JobError):
    """The job queue is full; retry later."""


class GeneratorUnavailable(JobError):
    """No generator is loaded."""


def utc_iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Job:
    """One job: its request, where it stands, and when it got there (Unix seconds). `seq` orders
    jobs by creation (the queue's order and the listing's cursor)."""

    id: str
    seq: int
    status: str
    request: JobRequest
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
        return self.request.num_videos

    def to_json(self) -> dict:
        """The job as the API shows it."""
        url = f"/v1/jobs/{self.id}"
        return {
            "id": self.id,
            "status": self.status,
            "url": url,
            "request": self.request.as_sent(),
            "progress": {"videos_done": self.videos_done, "videos": self.num_videos,
                         "step": self.step, "steps": self.request.steps},
            "created_at": utc_iso(self.created_at),
            "started_at": utc_iso(self.started_at),
            "finished_at": utc_iso(self.finished_at),
            "error": self.error,
            "cancel_requested": self.cancel_requested,
            "attempts": self.attempts,
            "results": [f"{url}/results/{k}" for k in range(self.num_videos)] if self.status == "succeeded" else [],
        }
