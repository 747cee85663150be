"""The engine: model replicas with their batching workers, admission, splitting and routing."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

import torch

from coordtok.model import CoordTok, Triplane
from coordtok.service.engine.errors import DeadlineExceeded, NotReady, QueueFull
from coordtok.service.engine.work import DecodeWork, EncodeWork, Work, decode_cost
from coordtok.service.engine.worker import DeviceWorker, WarmUp, allow_tf32_matmuls

log = logging.getLogger("coordtok.engine")


class Engine:
    """Model replicas on `models`' devices with their batching workers, and the admission gate.
    Keys are device names (`cuda:0`, `cpu`; `cpu:0`, `cpu:1` give several CPU replicas).

    `stopping` is the server's one stop signal: once it is set, `admit` refuses new work and the
    generation lane puts its running jobs back in the queue; `stop()` sets it and ends the workers."""

    def __init__(self, models: dict[str, CoordTok], batch_max_frames: int, batch_wait_ms: float,
                 max_queue: int, request_timeout_s: float, on_batch=None, compile_decoder: bool = False) -> None:
        if any(torch.device(device).type == "cuda" for device in models):
            allow_tf32_matmuls()
        self.workers = [
            DeviceWorker(model, torch.device(device), batch_max_frames, batch_wait_ms / 1000, on_batch,
                         self._requeue, compile_decoder)
            for device, model in models.items()
        ]
        self.model_config = next(iter(models.values())).config  # every replica serves the same model
        self.batch_max_frames = batch_max_frames
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.in_system = 0
        self.stopping = threading.Event()
        self._started = False
        self._lock = threading.Lock()

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        self._started = True

    def stop(self) -> None:
        """Refuse new work and end the workers (after their running batches)."""
        self.stopping.set()
        for worker in self.workers:
            worker.stop()

    @property
    def accepting(self) -> bool:
        """Started and not stopping: new work is admitted."""
        return self._started and not self.stopping.is_set()

    def warm_up(self) -> list[WarmUp]:
        """Warm every replica up (see `DeviceWorker.warm_up`), logging what each took."""
        reports = []
        for worker in self.workers:
            report = worker.warm_up()
            log.info("warmed up", extra=vars(report))
            reports.append(report)
        return reports

    @property
    def ready(self) -> bool:
        """Accepting work, and some replica serves."""
        return self.accepting and any(w.in_service and w.healthy for w in self.workers)

    @property
    def alive(self) -> bool:
        """Some replica is in service (false: the process should be restarted)."""
        return any(w.in_service for w in self.workers)

    def states(self) -> dict[str, str]:
        """Each replica's state: serving, probing or out of service."""
        return {str(w.device): w.state for w in self.workers}

    @contextlib.contextmanager
    def admit(self):
        """Hold a place in the system for the duration of one request."""
        with self._lock:
            if not self.accepting:
                raise NotReady("the server is not accepting work (starting up or shutting down)")
            if self.in_system >= self.max_queue:
                raise QueueFull(f"{self.in_system} requests are in progress (the limit is {self.max_queue}); retry later")
            self.in_system += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_system -= 1

    async def encode(self, clips: torch.Tensor, n_frames: torch.Tensor) -> Triplane:
        """clips uint8 [K, T, H, W, 3], n_frames [K] -> Triplane of K clips (CPU, float32)."""
        k = self.clips_per_batch(clips.shape[1])
        pieces = [EncodeWork(clips[i:i + k], n_frames[i:i + k]) for i in range(0, len(clips), k)]
        return Triplane.cat(await self._run(pieces))

    async def decode(self, triplane: Triplane, frames: tuple[int, int]) -> torch.Tensor:
        """Triplane of K clips, frame range [a, b) -> uint8 [K, b - a, H, W, 3] (CPU)."""
        clip_cost = decode_cost(self.model_config, frames)
        k = self.clips_per_batch(clip_cost)
        pieces = [DecodeWork(triplane[i:i + k], frames, clip_cost) for i in range(0, triplane.batch_size, k)]
        return torch.cat(await self._run(pieces))

    def clips_per_batch(self, cost_per_clip: int) -> int:
        """Clips that fit in one batch (a request's piece), one at least."""
        return max(1, self.batch_max_frames // cost_per_clip)

    async def _run(self, pieces: list[Work]) -> list:
        """Route each piece of one request and wait for all of them."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.request_timeout_s
        futures = [piece.submit(loop, deadline) for piece in pieces]
        for piece in pieces:
            self._route(piece)
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), self.request_timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"the request did not finish within {self.request_timeout_s:g} s") from None
        finally:  # failed, timed out, or the client went away: the workers skip what is left
            for future in futures:
                future.cancel()

    def _route(self, work: Work) -> None:
        """Queue work on the least-loaded replica in service, preferring those whose probe passed."""
        while True:
            serving = [w for w in self.workers if w.in_service]
            if not serving:
                raise NotReady("no device is in service; the server needs a restart")
            healthy = [w for w in serving if w.healthy] or serving
            if min(healthy, key=lambda w: w.load).put(work):
                return

    def _requeue(self, worker: DeviceWorker, queued: list[Work]) -> None:
        """Move the work queued on a replica taken out of service to the others."""
        for work in queued:
            try:
                self._route(work)
            except NotReady as error:
                work.finish(error=error)
