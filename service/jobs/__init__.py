"""Generation jobs: the request, the job store, the generator and the generation lane.

POST /v1/generate writes a job (`queued`) to the store (`store.py`: SQLite and result files). The
lane (`lane.py`) claims it (`running`), samples its videos with the SiT generator
(`generator.py`), decodes them through the engine, writes the files, and finishes the job
(`succeeded`, `failed` or `cancelled`). The lane reaches the store through the small `JobQueue`
interface, so that another store (a database shared by several servers) can take SQLite's place.
"""
from coordtok.model.transport import SAMPLERS
from coordtok.service.jobs.generator import Generator, load_generator
from coordtok.service.jobs.job import (FINISHED, STATUSES, GeneratorUnavailable, Job, JobConflict, JobError,
                                       JobNotFound, TooManyJobs)
from coordtok.service.jobs.lane import GenerationLane, JobQueue, token_identity
from coordtok.service.jobs.request import RESULT_TYPES, GenerateRequest, JobRequest
from coordtok.service.jobs.store import JobStore

__all__ = [
    "FINISHED", "RESULT_TYPES", "SAMPLERS", "STATUSES", "GenerateRequest", "GenerationLane", "Generator",
    "GeneratorUnavailable", "Job", "JobConflict", "JobError", "JobNotFound", "JobQueue", "JobRequest", "JobStore",
    "TooManyJobs", "load_generator", "token_identity",
]
