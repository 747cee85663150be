"""Generation jobs: the request, the job store, the generator and the generation lane.

POST /v1/generate writes a job (`queued`), with the models it is made with, to the store
(`store.py`: SQLite, or PostgreSQL for several servers, in the table of `schema.py`; result files).
The lane (`lane.py`) of a server with those models claims it (`running`, under a lease), samples
its videos with the SiT generator (`generator.py`), decodes them through the engine, writes the
files, and finishes the job (`succeeded`, `failed` or `cancelled`). On SQLite one server's lane
holds the jobs dir (`ownership.py`). The lane reaches the store through the small `JobQueue`
interface.
"""
from coordtok.model.transport import SAMPLERS
from coordtok.service.jobs.generator import Generator, load_generator
from coordtok.service.jobs.job import (FINISHED, STATUSES, GeneratorUnavailable, Job, JobConflict, JobError,
                                       JobModels, JobNotFound, TooManyJobs)
from coordtok.service.jobs.lane import GenerationLane, JobQueue, token_identity
from coordtok.service.jobs.ownership import JobsDirBusy, JobsDirLock
from coordtok.service.jobs.request import RESULT_TYPES, GenerateRequest, JobRequest
from coordtok.service.jobs.store import JobStore

__all__ = [
    "FINISHED", "RESULT_TYPES", "SAMPLERS", "STATUSES", "GenerateRequest", "GenerationLane", "Generator",
    "GeneratorUnavailable", "Job", "JobConflict", "JobError", "JobModels", "JobNotFound", "JobQueue", "JobRequest",
    "JobStore", "JobsDirBusy", "JobsDirLock", "TooManyJobs", "load_generator", "token_identity",
]
