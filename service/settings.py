"""Server settings, from (highest first) explicit arguments, environment variables prefixed
`COORDTOK_` (e.g. `COORDTOK_MAX_QUEUE=64`), and the settings file named by `COORDTOK_SETTINGS_FILE`
(JSON, or a .env file). Every limit on what the server holds per request is one of these, with a
sane default."""
from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from coordtok.formats.video import MediaLimits
from coordtok.service.jobs.schema import database_url


def default_jobs_dir() -> Path:
    """`$XDG_DATA_HOME/coordtok/jobs`, by default `~/.local/share/coordtok/jobs`."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "coordtok" / "jobs"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COORDTOK_", extra="forbid")

    # The model: a .safetensors path, a preset name, or empty for the bundled default.
    model: str = ""
    devices: list[str] = Field(default_factory=list, description="e.g. [\"cuda:0\", \"cuda:1\"]; empty: every GPU, else the CPU")

    # Dynamic batching: a batch closes at `batch_max_frames` frames of work or after `batch_wait_ms`.
    batch_max_frames: int = Field(512, ge=1)
    batch_wait_ms: float = Field(10.0, ge=0)
    compile_decoder: bool = Field(False, description="torch.compile the decoder (compiled during the warm-up)")
    max_queue: int = Field(32, ge=1, description="requests waiting or running; more get 503")
    request_timeout_s: float = Field(300.0, gt=0, description="from the end of the request body to the answer: "
                                     "media decoding, the model and media encoding (504 past it)")
    drain_timeout_s: float = Field(30.0, ge=0)

    # Slow clients. A request's headers must arrive within `header_timeout_s` of the connection
    # opening (or of the first byte of a later request on it), its body within `body_timeout_s` of
    # the headers and, after the first seconds, at `body_min_rate` bytes/s on average (408 otherwise).
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(120.0, gt=0)
    body_min_rate: int = Field(64 * 1024, ge=1, description="bytes/s")

    # Input limits.
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1)
    max_width: int = Field(4096, ge=1)
    max_height: int = Field(4096, ge=1)
    max_duration_s: float = Field(600.0, gt=0, description="seconds into a video a request may read: a longer "
                                  "video is read with an `end` by then")
    max_frames: int = Field(20000, ge=1, description="source frames a request may read")
    max_clips: int = Field(64, ge=1, description="clips per encode or decode request")
    max_streams: int = Field(8, ge=1, description="streams (video, audio, subtitles, ...) in an uploaded file")
    max_decode_pixels: int = Field(1 << 28, ge=1, description="frames x height x width of one /v1/decode answer "
                                   "(restore_size included): 268M, about 800 MB of RGB; the answer streams, "
                                   "so a request holds a clip or two of it at a time")

    # Generation jobs (POST /v1/generate). The generator: a .safetensors path, empty for the
    # bundled one, or "none"; without one (or when the file is missing) the server runs and
    # generate answers 503. Only a server with a generator runs, recovers and sweeps jobs.
    generator: str = ""
    # The jobs dir holds the SQLite job database (unless `jobs_db` names PostgreSQL) and, by
    # default, the results. With SQLite one server runs its jobs: the lane of a server with a
    # generator locks the jobs dir (`jobs_dir/lane.lock`), and a second server with a generator on
    # the same jobs dir does not start: it exits with one line naming the server that holds it
    # (pid, host, address). Servers without a generator list jobs and serve results beside it.
    jobs_dir: Path = Field(default_factory=default_jobs_dir, description="the job database and results")
    jobs_db: SecretStr = Field(SecretStr(""), description="empty: SQLite in jobs_dir; postgresql://user:password@host/db: "
                               "one job queue for several servers (each claims jobs its models can run)")
    results_dir: Path | None = Field(None, description="generated videos (default: jobs_dir/results); with several "
                                     "servers, a folder they all mount")
    job_lease_s: float = Field(30.0, ge=1, description="a running job is held under a lease its server renews every "
                               "third of this; a job whose server died is run by another once it runs out")
    max_videos_per_job: int = Field(16, ge=1)
    max_generation_steps: int = Field(250, ge=1, description="sampling steps per video")
    max_queued_jobs: int = Field(100, ge=1, description="jobs queued or running; more get 503")
    generation_concurrency: int = Field(1, ge=1, description="jobs generating at once (the lane's threads)")
    generation_batch_size: int = Field(4, ge=1, description="videos of a job sampled together")
    job_retention_hours: float = Field(72.0, gt=0, description="finished jobs and results are removed after this")
    job_sweep_interval_s: float = Field(600.0, gt=0)

    api_keys: list[SecretStr] = Field(default_factory=list, description="bearer keys; empty: no authentication")
    cors_origins: list[str] = Field(default_factory=list, description="origins a browser may call the API from "
                                    "(e.g. [\"https://app.example\"]); empty: no CORS headers")
    log_format: Literal["json", "text"] = "json"
    upload_dir: Path | None = None  # temporary uploads (default: the system's temp folder)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        path = os.environ.get("COORDTOK_SETTINGS_FILE")
        if path:
            if not Path(path).is_file():
                raise FileNotFoundError(f"COORDTOK_SETTINGS_FILE={path} does not exist")
            if path.endswith(".json"):
                sources.append(JsonConfigSettingsSource(settings_cls, json_file=path))
            else:
                sources.append(DotEnvSettingsSource(settings_cls, env_file=path))
        return tuple(sources)

    @field_validator("jobs_db")
    @classmethod
    def _postgresql_url(cls, value: SecretStr) -> SecretStr:
        database_url(value.get_secret_value(), Path("."))  # ValueError saying what to write
        return value

    def media_limits(self) -> MediaLimits:
        return MediaLimits(
            max_width=self.max_width, max_height=self.max_height, max_pixels=self.max_width * self.max_height,
            max_duration_s=self.max_duration_s, max_frames=self.max_frames, max_streams=self.max_streams,
        )


# COORDTOK_* variables that are not settings: read by kernels/ (the triplane backend), the Docker
# entry point and compose file, and the tests.
OTHER_VARIABLES = {
    "COORDTOK_SETTINGS_FILE", "COORDTOK_TRIPLANE_BACKEND", "COORDTOK_TRIPLANE_DETERMINISTIC",
    "COORDTOK_HOST", "COORDTOK_PORT", "COORDTOK_MODELS_DIR", "COORDTOK_MODELS_HOST_DIR", "COORDTOK_HTTP_PORT",
    "COORDTOK_DB_PASSWORD",
    "COORDTOK_PARITY_DIR", "COORDTOK_PLAYGROUND_SCREENSHOT", "COORDTOK_FUZZ_EXAMPLES", "COORDTOK_TRITON_36",
}


def unknown_variables(environ: Mapping[str, str] = os.environ) -> list[str]:
    """A warning for each `COORDTOK_*` variable in `environ` that is neither a setting nor one of
    OTHER_VARIABLES (a typo such as COORDTOK_MAXQUEUE would otherwise be ignored silently),
    naming the closest known variable."""
    known = {f"COORDTOK_{name.upper()}" for name in Settings.model_fields} | OTHER_VARIABLES
    warnings = []
    for name in sorted(environ):
        upper = name.upper()  # settings variables are matched case-insensitively
        if upper.startswith("COORDTOK_") and upper not in known:
            close = difflib.get_close_matches(upper.removeprefix("COORDTOK_"), [k.removeprefix("COORDTOK_") for k in known], n=1)
            hint = f"; did you mean COORDTOK_{close[0]}?" if close else ""
            warnings.append(f"{name} is not a CoordTok setting and is ignored{hint}")
    return warnings
