"""The inference engine: one worker per device, dynamic batching, back-pressure.

Routes hand work to `Engine.encode` / `Engine.decode` and await the result. Work waits in the
queue of the least-loaded device; that device's worker takes the oldest item, then keeps
adding items of the same kind (decode: the same frame range) until the batch holds
`batch_max_frames` frames of work or `batch_wait_ms` have passed, runs them as one forward
pass, and hands each request its share. Batched results equal unbatched ones: clips never
interact in CoordTok's encoder or decoder.

Back-pressure: `Engine.admit()` reserves a place before the request body is read; past `max_queue`
requests in the system it raises `QueueFull` (503). Work whose deadline passes while it waits is
dropped (`DeadlineExceeded`, 504); work whose request went away (a cancelled future) is skipped.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model import CoordTok, Triplane
from model.triplane import from_uint8, to_uint8


class EngineError(Exception):
    http_status = 500


class QueueFull(EngineError):
    """Too many requests in the system; retry later."""

    http_status = 503


class DeadlineExceeded(EngineError):
    """The request waited past its deadline."""

    http_status = 504


class DeviceFailure(EngineError):
    """The batch holding this request failed on its device (503 when out of memory: retry)."""

    def __init__(self, message: str, out_of_memory: bool) -> None:
        super().__init__(message)
        self.out_of_memory = out_of_memory
        self.http_status = 503 if out_of_memory else 500

    @classmethod
    def of(cls, error: Exception, device: torch.device) -> DeviceFailure:
        if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
            return cls(f"{device} ran out of memory on a batch holding this request; retry, or send fewer clips", True)
        return cls(f"the batch holding this request failed on {device}: {type(error).__name__}: {error}", False)


class NotReady(EngineError):
    """The server is starting, draining or its devices are failing."""

    http_status = 503


@dataclass
class Work:
    """One request's clips. encode: `clips` uint8 [K, T, H, W, 3] and `n_frames` [K];
    decode: `triplane` of K clips and the frame range `frames`. `cost` is frames of work."""

    kind: str
    cost: int
    deadline: float  # time.monotonic() after which the work is dropped
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    clips: torch.Tensor | None = None
    n_frames: torch.Tensor | None = None
    triplane: Triplane | None = None
    frames: tuple[int, int] | None = None

    @property
    def batch_key(self) -> tuple:
        return (self.kind, self.frames)

    def finish(self, result=None, error: BaseException | None = None) -> None:
        def settle():
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        if self.future.done():  # cancelled: the request went away or timed out
            return
        with contextlib.suppress(RuntimeError):  # the event loop has closed (shutdown)
            self.loop.call_soon_threadsafe(settle)


@dataclass
class BatchStats:
    """What the worker reports after each batch (for metrics and readiness)."""

    device: str
    kind: str
    requests: int
    frames: int
    seconds: float
    ok: bool
    out_of_memory: bool = False


class DeviceWorker:
    """A model replica on one device, and the thread that runs its batches."""

    def __init__(self, model: CoordTok, device: torch.device, batch_max_frames: int, batch_wait_s: float,
                 on_batch: Callable[[BatchStats], None] | None = None) -> None:
        self.model, self.device = model, device
        self.batch_max_frames, self.batch_wait_s = batch_max_frames, batch_wait_s
        self.on_batch = on_batch
        self.pending: deque[Work] = deque()
        self.pending_cost = 0  # frames of work waiting: the load that routing balances
        self.healthy = True  # the last batch succeeded
        self.running = 0  # requests in the batch running now
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"coordtok-{self.device}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def put(self, work: Work) -> None:
        with self._wake:
            self.pending.append(work)
            self.pending_cost += work.cost
            self._wake.notify()

    def _take_batch(self) -> list[Work] | None:
        """Block for the first live item, then gather compatible ones until the frame budget
        is met or the wait is over. Returns None when stopping."""
        with self._wake:
            first = None
            while first is None:
                while not self.pending and not self._stop:
                    self._wake.wait()
                if self._stop:
                    return None
                first = self._pop_live(self.pending.popleft())
            batch, frames = [first], first.cost
            closes = time.monotonic() + self.batch_wait_s
            while frames < self.batch_max_frames:
                match = next((w for w in self.pending if w.batch_key == first.batch_key
                              and frames + w.cost <= self.batch_max_frames), None)
                if match is not None:
                    self.pending.remove(match)
                    if self._pop_live(match) is not None:
                        batch.append(match)
                        frames += match.cost
                    continue
                remaining = closes - time.monotonic()
                if remaining <= 0 or self._stop:
                    break
                self._wake.wait(remaining)
            return batch

    def _pop_live(self, work: Work) -> Work | None:
        """Account for a removed item; None if its request is gone or its deadline passed."""
        self.pending_cost -= work.cost
        if work.future.cancelled():
            return None
        if time.monotonic() > work.deadline:
            work.finish(error=DeadlineExceeded("the request waited in the queue past its deadline"))
            return None
        return work

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            batch = [work for work in batch if not work.future.cancelled()]  # gone while the batch filled
            if not batch:
                continue
            started = time.perf_counter()
            self.running = len(batch)
            try:
                results = self.run(batch)
            except Exception as error:  # a failed batch fails its requests, not the worker
                self.running = 0
                failure = DeviceFailure.of(error, self.device)
                self.healthy = self.probe()  # before the requests learn of the failure: readiness is current
                for work in batch:
                    work.finish(error=failure)
                self._report(batch, started, ok=False, out_of_memory=failure.out_of_memory)
                continue
            self.healthy, self.running = True, 0
            for work, result in zip(batch, results):
                work.finish(result)
            self._report(batch, started, ok=True)

    @torch.inference_mode()
    def probe(self) -> bool:
        """A tiny forward pass (one patch decoded from a zero triplane): is the device usable?"""
        c = self.model.config
        dtype = next(self.model.parameters()).dtype
        try:
            zeros = Triplane(*(torch.zeros(1, *shape, device=self.device, dtype=dtype) for shape in (
                (c.latent_res_xy, c.latent_res_xy, c.latent_channels),
                (c.latent_res_t, c.latent_res_xy, c.latent_channels),
                (c.latent_res_t, c.latent_res_xy, c.latent_channels))))
            self.model.decode(zeros, torch.zeros(1, 1, 3, device=self.device))
            return True
        except Exception:
            return False

    def _report(self, batch: list[Work], started: float, ok: bool, out_of_memory: bool = False) -> None:
        if self.on_batch is not None:
            self.on_batch(BatchStats(str(self.device), batch[0].kind, len(batch), sum(w.cost for w in batch),
                                     time.perf_counter() - started, ok, out_of_memory))

    def run(self, batch: list[Work]) -> list:
        """Run one batch as a single forward pass (bf16 autocast on GPUs that support it);
        returns each item's result in order."""
        bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            return self._forward(batch)

    def _forward(self, batch: list[Work]) -> list:
        sizes = [len(w.clips) if w.kind == "encode" else w.triplane.batch_size for w in batch]
        if batch[0].kind == "encode":
            video = from_uint8(torch.cat([w.clips for w in batch]).to(self.device))
            n_frames = torch.cat([w.n_frames for w in batch]).to(self.device)
            return self.model.encode(video, n_frames).to("cpu", torch.float32).split(sizes)
        triplane = Triplane.cat([w.triplane for w in batch]).to(self.device, next(self.model.parameters()).dtype)
        video = self.model.decode_video(triplane, frames=batch[0].frames)
        return list(to_uint8(video).cpu().split(sizes))


class Engine:
    """Model replicas on `devices` with their batching workers, and the admission gate."""

    def __init__(self, models: dict[str, CoordTok], batch_max_frames: int, batch_wait_ms: float,
                 max_queue: int, request_timeout_s: float, on_batch=None) -> None:
        self.workers = [
            DeviceWorker(model, torch.device(device), batch_max_frames, batch_wait_ms / 1000, on_batch)
            for device, model in models.items()
        ]
        self.config = next(iter(models.values())).config
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.in_system = 0
        self.accepting = False
        self._lock = threading.Lock()

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        self.accepting = True

    def stop(self) -> None:
        self.accepting = False
        for worker in self.workers:
            worker.stop()

    @property
    def ready(self) -> bool:
        return self.accepting and all(w.healthy for w in self.workers)

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
        return await self._submit("encode", int(clips.shape[0] * clips.shape[1]), clips=clips, n_frames=n_frames)

    async def decode(self, triplane: Triplane, frames: tuple[int, int]) -> torch.Tensor:
        """Triplane of K clips, frame range [a, b) -> uint8 [K, b - a, H, W, 3] (CPU)."""
        return await self._submit("decode", triplane.batch_size * (frames[1] - frames[0]), triplane=triplane, frames=frames)

    async def _submit(self, kind: str, cost: int, **payload):
        loop = asyncio.get_running_loop()
        work = Work(kind, cost, time.monotonic() + self.request_timeout_s, loop, loop.create_future(), **payload)
        min(self.workers, key=lambda w: w.pending_cost).put(work)
        try:
            return await asyncio.wait_for(asyncio.shield(work.future), self.request_timeout_s)
        except asyncio.TimeoutError:
            work.future.cancel()
            raise DeadlineExceeded(f"the request did not finish within {self.request_timeout_s:g} s") from None
        except asyncio.CancelledError:
            work.future.cancel()  # the client went away: the worker skips this work
            raise
