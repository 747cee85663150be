"""A generation job as every store keeps it and as the API shows it, the models it is made with;
the errors of job requests."""
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


@dataclass(frozen=True)
class JobModels:
    """The tokenizer and the generator a job is made with: their ids and weights' sha256, as
    /v1/models reports them. Only a server serving the same weights (the same two sha256) runs the
    job; the ids, which name the files, are for people."""

    tokenizer_id: str
    tokenizer_sha256: str
    generator_id: str
    generator_sha256: str

    def runs(self, job_models: JobModels | None) -> bool:
        """Whether a server with these models runs a job made with `job_models` (None: a job from
        before jobs recorded their models, which any server runs)."""
        return job_models is None or (job_models.tokenizer_sha256, job_models.generator_sha256) == \
            (self.tokenizer_sha256, self.generator_sha256)

    def describe(self) -> str:
        return f"tokenizer {self.tokenizer_id} and generator {self.generator_id}"

    def to_json(self) -> dict:
        return {"tokenizer": {"id": self.tokenizer_id, "weights_sha256": self.tokenizer_sha256},
                "generator": {"id": self.generator_id, "weights_sha256": self.generator_sha256}}


def utc_iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Job:
    """One job: its request, the models it is made with, where it stands, and when it got there
    (Unix seconds). `seq` orders jobs by creation (the queue's order and the listing's cursor)."""

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
    models: JobModels | None = None  # None: made before jobs recorded their models

    @property
    def num_videos(self) -> int:
        return self.request.num_videos

    def waiting_for(self, runs: JobModels | None) -> str | None:
        """Why a queued job does not run on a server with the models `runs` (None: no generator);
        None when it would."""
        if self.status != "queued" or (runs is not None and runs.runs(self.models)):
            return None
        here = f"this server runs {runs.describe()}" if runs is not None else "this server has no generator"
        wanted = self.models.describe() if self.models is not None else "a generator"
        return f"a server with {wanted} ({here})"

    def to_json(self, runs: JobModels | None = None) -> dict:
        """The job as the API shows it, answered by a server with the models `runs` (None: no
        generator), which says what a queued job that it does not run waits for."""
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
            "models": None if self.models is None else self.models.to_json(),
            "waiting_for": self.waiting_for(runs),
            "results": [f"{url}/results/{k}" for k in range(self.num_videos)] if self.status == "succeeded" else [],
        }
