"""Prometheus metric families of the server, declared in one place (prefix `coordtok_`).

Each app owns a registry, so tests can build many apps. Names and units follow Prometheus
conventions (seconds, bytes, `_total` counters) and the families that users of TEI, vLLM and
Triton Inference Server already chart; labels stay low-cardinality (route, status, reason, phase,
kind, device: never a request id).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from coordtok.service.jobs.job import FINISHED

if TYPE_CHECKING:
    from coordtok.service.engine import BatchStats, Engine
    from coordtok.service.jobs import Job

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BYTES_BUCKETS = tuple(2**k for k in range(10, 31, 2))  # 1 KiB .. 1 GiB
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
FRAMES_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
JOB_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
STEP_RATE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("coordtok_requests", "Requests by route and HTTP status.", ["route", "status"], registry=r)
        self.failures = Counter("coordtok_request_failures", "Failed requests by route and reason.", ["route", "reason"], registry=r)
        self.cancelled = Counter("coordtok_requests_cancelled", "Requests whose client went away before the answer.", ["route"], registry=r)
        self.duration = Histogram("coordtok_request_duration_seconds", "Request time from arrival to response.",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.phase = Histogram("coordtok_request_phase_seconds", "Request time per phase: queue, media_decode, inference, media_encode.",
                               ["route", "phase"], buckets=LATENCY_BUCKETS, registry=r)
        self.body_bytes = Histogram("coordtok_request_body_bytes", "Request body size.", ["route"], buckets=BYTES_BUCKETS, registry=r)
        self.input_frames = Counter("coordtok_input_frames", "Video frames received (encode) or requested (decode).", ["route"], registry=r)
        self.queue_size = Gauge("coordtok_queue_size", "Requests admitted and not yet answered.", registry=r)
        self.running = Gauge("coordtok_requests_running", "Requests in the batch running on each device.", ["device"], registry=r)
        self.batch_size = Histogram("coordtok_batch_size", "Requests per batch.", ["kind"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_frames = Histogram("coordtok_batch_frames", "Frames of work per batch.", ["kind"], buckets=FRAMES_BUCKETS, registry=r)
        self.model_seconds = Histogram("coordtok_batch_duration_seconds", "Model time per batch.", ["kind", "device"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.frames = Counter("coordtok_frames_processed", "Frames encoded or decoded.", ["kind"], registry=r)
        self.tokens = Counter("coordtok_tokens_processed", "Latent tokens produced (encode) or consumed (decode).", ["kind"], registry=r)
        self.gpu_allocated = Gauge("coordtok_gpu_memory_allocated_bytes", "GPU memory allocated by tensors.", ["device"], registry=r)
        self.gpu_reserved = Gauge("coordtok_gpu_memory_reserved_bytes", "GPU memory reserved by the caching allocator.", ["device"], registry=r)
        self.oom = Counter("coordtok_out_of_memory", "Batches that ran out of device memory.", ["device"], registry=r)
        self.model_load = Gauge("coordtok_model_load_seconds", "Time to load and warm up the model, per device.", ["device"], registry=r)
        self.warmup_memory = Gauge("coordtok_warmup_peak_memory_bytes", "Peak GPU memory allocated while warming up on the "
                                   "largest batches the settings allow (weights included).", ["device"], registry=r)
        self.ready = Gauge("coordtok_ready", "1 when the server accepts work.", registry=r)
        self.jobs = Gauge("coordtok_jobs", "Generation jobs by current status.", ["status"], registry=r)
        self.job_transitions = Counter("coordtok_job_transitions", "Generation jobs entering each status.", ["status"], registry=r)
        self.job_wait = Histogram("coordtok_job_queue_seconds", "Time from a job's creation to its first start.",
                                  buckets=JOB_BUCKETS, registry=r)
        self.job_duration = Histogram("coordtok_job_duration_seconds", "Time from a job's first start to its end, by final status.",
                                      ["status"], buckets=JOB_BUCKETS, registry=r)
        self.sampling_rate = Histogram("coordtok_sampling_steps_per_second", "Sampling steps per second, per group of videos sampled together.",
                                       buckets=STEP_RATE_BUCKETS, registry=r)
        self.videos_generated = Counter("coordtok_videos_generated", "Videos of succeeded generation jobs.", registry=r)
        self.build = Info("coordtok_build", "Server build.", registry=r)
        self.model = Info("coordtok_model", "The served model.", registry=r)

    def observe_batch(self, stats: BatchStats) -> None:
        """The engine's report of one batch (its `on_batch`)."""
        self.batch_size.labels(stats.kind).observe(stats.requests)
        self.batch_frames.labels(stats.kind).observe(stats.frames)
        self.model_seconds.labels(stats.kind, stats.device).observe(stats.seconds)
        if stats.ok:
            self.frames.labels(stats.kind).inc(stats.frames)
        if stats.out_of_memory:
            self.oom.labels(stats.device).inc()

    def observe_transition(self, job: Job) -> None:
        """A job entered `job.status` (the job store's `on_transition`)."""
        self.job_transitions.labels(job.status).inc()
        if job.status == "running" and job.attempts == 1:
            self.job_wait.observe(job.started_at - job.created_at)
        elif job.status in FINISHED and job.started_at is not None:
            self.job_duration.labels(job.status).observe(job.finished_at - job.started_at)
            if job.status == "succeeded":
                self.videos_generated.inc(job.num_videos)

    def observe_sampling(self, steps: int, seconds: float) -> None:
        """A group of videos sampled in `steps` steps (the generation lane's `on_sampled`)."""
        self.sampling_rate.observe(steps / max(seconds, 1e-9))

    def refresh(self, engine: Engine, devices: list[str], job_counts: Mapping[str, int]) -> None:
        """Set the gauges computed at scrape time: queue, running batches, GPU memory, jobs by status."""
        self.queue_size.set(engine.in_system)
        for worker in engine.workers:
            self.running.labels(str(worker.device)).set(worker.running)
        for device in devices:
            if device.startswith("cuda"):
                self.gpu_allocated.labels(device).set(torch.cuda.memory_allocated(device))
                self.gpu_reserved.labels(device).set(torch.cuda.memory_reserved(device))
        for status, count in job_counts.items():
            self.jobs.labels(status).set(count)
