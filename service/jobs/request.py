"""What a generation job is asked to make: the body of POST /v1/generate, and the request a job
keeps (that body with the seed fixed and the sampling groups chosen)."""
from __future__ import annotations

import hashlib
import json
import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from coordtok.formats import tokens
from coordtok.formats.video import FALLBACK_FPS, MAX_FPS, MIN_FPS
from coordtok.formats.video_write import OUTPUT_FORMATS
from coordtok.model.transport import SAMPLERS

# Output format -> (file extension, media type) of a job's results: a video, or a token file.
RESULT_TYPES = {
    **{name: (name, OUTPUT_FORMATS[name].media_type) for name in ("mp4", "webm")},
    "tokens": ("safetensors", tokens.FORMATS["safetensors"]),
}
MAX_SEED = 2**63 - 1


class GenerateRequest(BaseModel):
    """The body of POST /v1/generate. Limits that are settings (videos, steps) are checked by the
    route; these are the fixed ones."""

    model_config = ConfigDict(extra="forbid")

    num_videos: int = Field(1, ge=1, description="videos to generate")
    steps: int = Field(50, ge=1, description="sampling steps per video")
    sampler: Literal[SAMPLERS] = "euler"
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="absent: the server picks one and reports it")
    guidance: float = Field(1.0, ge=1.0, le=100.0, description="classifier-free guidance scale (1: none)")
    class_label: int | None = Field(None, ge=0, description="for a class-conditional generator")
    format: Literal[tuple(RESULT_TYPES)] = "mp4"
    fps: float = Field(FALLBACK_FPS, ge=MIN_FPS, le=MAX_FPS, description="frame rate written into mp4/webm results")

    def fingerprint(self) -> str:
        """Identity of the request as sent, for Idempotency-Key (a seed the server picks is not part of it)."""
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()


class JobRequest(GenerateRequest):
    """A job's request as stored: the client's, with the seed fixed (picked when absent) and
    `batch_size`, the videos sampled together, fixed when the job is created."""

    seed: int = Field(ge=0, le=MAX_SEED)
    batch_size: int = Field(ge=1)

    @classmethod
    def of(cls, request: GenerateRequest, batch_size: int) -> JobRequest:
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        return cls(**{**request.model_dump(), "seed": seed, "batch_size": batch_size})

    def groups(self) -> list[range]:
        """The fixed groups of videos sampled together: [0, b), [b, 2b), ... Video k depends only on
        (seed, k), and a group is always sampled whole, so a rerun makes the same files."""
        b = self.batch_size
        return [range(a, min(a + b, self.num_videos)) for a in range(0, self.num_videos, b)]

    def as_sent(self) -> dict:
        """The request as the API shows it (the seed filled in)."""
        return self.model_dump(exclude={"batch_size"})
