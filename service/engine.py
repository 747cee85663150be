"""The inference engine: one model replica per device, dynamic batching, health-aware routing,
back-pressure.

Routes hand work to `Engine.encode` / `Engine.decode` and await the result. A request of more than
`batch_max_frames` frames of work is cut into pieces of whole clips that fit (one clip at least),
which may run on different replicas and are put back together for the answer. Each piece goes to
the replica with the fewest frames of work queued plus running, among those in service whose last
probe passed. Frames of work: an encode counts every frame of its clips, a decode every frame of
the decoder slices it computes (a range is decoded in whole slices, see `CoordTok.decode_video`).

Each replica's worker thread (on CUDA, with its device made current first: Triton and CUDA launch
on the thread's current device) takes the oldest item, then keeps adding items of the same kind
(decode: the same frame range) until the batch holds `batch_max_frames` frames of work or
`batch_wait_ms` have passed, runs them as one forward pass in the serving dtype (bf16 autocast on
GPUs that support it; fp32 matmuls may use TF32 on CUDA), and hands each request its share.
Batched results equal unbatched ones: clips never interact in CoordTok's encoder or decoder.
Uploads to a GPU go through pinned host memory without blocking the thread. `compile_decoder`
compiles the decoder with `torch.compile` (the Triton sampling kernel stays as it is).

Failures: a failed batch fails its requests (503 when the device ran out of memory or was lost,
500 otherwise), then the worker probes its device with a one-patch decode (up to three times, half
a second apart), routing avoiding it meanwhile. A non-recoverable device error (a sticky CUDA
error such as an illegal address or a device-side assert, after which every call on that device
fails) or a probe that keeps failing takes the replica out of service for good: its queued work
moves to the other replicas. The requests of the failed batch are not retried elsewhere: a batch
that broke one device could break the next. `ready` holds while some replica serves; `alive` turns
false when none is left, so that /healthz fails and the process is restarted.

Back-pressure: `Engine.admit()` reserves a place before the request body is read; past `max_queue`
requests in the system it raises `QueueFull` (503). Work whose deadline passes while it waits is
dropped (`DeadlineExceeded`, 504); work whose request went away (a cancelled future) is skipped.

`Engine.warm_up()` runs every replica once on the largest encode and decode batches the settings
allow, in its serving dtype, so that compilation and running out of memory happen at start-up, and
reports the peak device memory it saw.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from coordtok.model import CoordTok, Triplane
from coordtok.model.triplane import from_uint8, to_uint8

log = logging.getLogger("coordtok.engine")

# CUDA errors after which the device's context is unusable: every later call on it fails too.
STICKY_DEVICE_ERRORS = (
    "illegal memory access", "illegal address", "device-side assert", "unspecified launch failure",
    "misaligned address", "illegal instruction", "invalid program counter", "hardware stack error",
    "uncorrectable ecc error", "launch timed out", "gpu is lost", "device lost", "cuda-capable device",
)

PROBE_ATTEMPTS, PROBE_PAUSE_S = 3, 0.5


class EngineError(Exception):
    http_status = 500


class QueueFull(EngineError):
    """Too many requests in the system; retry later."""

    http_status = 503


class DeadlineExceeded(EngineError):
    """The request waited past its deadline."""

    http_status = 504


class DeviceFailure(EngineError):
    """The batch holding this request failed on its device: 503 (retry) when the device ran out of
    memory or was lost, 500 when the model failed on a usable device."""

    def __init__(self, message: str, out_of_memory: bool = False, device_lost: bool = False) -> None:
        super().__init__(message)
        self.out_of_memory, self.device_lost = out_of_memory, device_lost
        self.http_status = 503 if out_of_memory or device_lost else 500

    @classmethod
    def of(cls, error: Exception, device: torch.device) -> DeviceFailure:
        text = str(error).lower()
        if isinstance(error, torch.OutOfMemoryError) or "out of memory" in text:
            return cls(f"{device} ran out of memory on a batch holding this request; retry, or send fewer clips",
                       out_of_memory=True)
        if any(sticky in text for sticky in STICKY_DEVICE_ERRORS):
            return cls(f"{device} failed and was taken out of service ({type(error).__name__}: {error}); retry",
                       device_lost=True)
        return cls(f"the batch holding this request failed on {device}: {type(error).__name__}: {error}")


class NotReady(EngineError):
    """The server is starting, draining or has no device in service."""

    http_status = 503


@dataclass
class Work:
    """One piece of a request. encode: `clips` uint8 [K, T, H, W, 3] and `n_frames` [K];
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


@dataclass
class WarmUp:
    """One replica's warm-up: the batches it ran and the peak device memory they took (None on CPU)."""

    device: str
    dtype: str
    encode_clips: int
    decode_clips: int
    decode_frames: int
    seconds: float
    peak_memory_bytes: int | None


def decode_cost(config, frames: tuple[int, int]) -> int:
    """Frames one clip's decode of [a, b) computes: the whole decoder slices that overlap it."""
    s = config.decode_slice_frames
    first, stop = frames[0] // s * s, -(-frames[1] // s) * s
    return min(stop, config.frames) - first


def allow_tf32_matmuls() -> None:
    """Let fp32 matmuls on CUDA use TF32 (fp32 range, 10-bit mantissa inputs, fp32 accumulation).
    Under bf16 autocast this touches only the work autocast leaves in fp32."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch 2.9 and later
        matmul.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True


def upload(parts: list[torch.Tensor], device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Concatenate host tensors onto `device`. CUDA: into pinned memory, then a non-blocking copy
    (the thread goes on while it runs; later work on the stream waits for it)."""
    if device.type != "cuda":
        return torch.cat(parts).to(device, dtype)
    staged = torch.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype, pin_memory=True)
    torch.cat(parts, out=staged)
    return staged.to(device, dtype, non_blocking=True)


class DeviceWorker:
    """A model replica on one device, and the thread that runs its batches."""

    def __init__(self, model: CoordTok, device: torch.device, batch_max_frames: int, batch_wait_s: float,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 on_out_of_service: Callable[[DeviceWorker, list[Work]], None] | None = None,
                 compile_decoder: bool = False) -> None:
        self.model, self.device = model, device
        self.batch_max_frames, self.batch_wait_s = batch_max_frames, batch_wait_s
        self.on_batch, self.on_out_of_service = on_batch, on_out_of_service
        self.dtype = next(model.parameters()).dtype
        self.autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()  # the serving dtype: bf16
        if compile_decoder:
            model.decoder.compile(dynamic=True)  # compiled at the first call (the warm-up)
        self.pending: deque[Work] = deque()
        self.pending_cost = 0  # frames of work waiting
        self.running = 0  # requests in the batch running now
        self.running_cost = 0  # frames of work in it
        self.healthy = True  # the last batch succeeded, or the probe after it passed
        self.in_service = True  # false for good after a non-recoverable failure
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    @property
    def load(self) -> int:
        """Frames of work queued plus running: what routing balances."""
        return self.pending_cost + self.running_cost

    @property
    def state(self) -> str:
        if not self.in_service:
            return "out of service"
        return "serving" if self.healthy else "probing"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"coordtok-{self.device}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def put(self, work: Work) -> bool:
        """Queue work; False (nothing queued) once the replica is out of service."""
        with self._wake:
            if not self.in_service:
                return False
            self.pending.append(work)
            self.pending_cost += work.cost
            self._wake.notify()
            return True

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
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while (batch := self._take_batch()) is not None:
            batch = [work for work in batch if not work.future.cancelled()]  # gone while the batch filled
            if not batch:
                continue
            started = time.perf_counter()
            self.running, self.running_cost = len(batch), sum(w.cost for w in batch)
            try:
                results = self.run(batch)
            except Exception as error:  # a failed batch fails its requests, not the worker
                self.running, self.running_cost = 0, 0
                failure = DeviceFailure.of(error, self.device)
                # Before the requests learn of the failure, so that readiness is current when they do.
                self.healthy = False  # routing avoids the replica while it is probed
                self.healthy = not failure.device_lost and self._device_usable()
                if not self.healthy:
                    self._take_out_of_service(error)
                for work in batch:
                    work.finish(error=failure)
                self._report(batch, started, ok=False, out_of_memory=failure.out_of_memory)
                if not self.in_service:
                    return
                continue
            self.healthy, self.running, self.running_cost = True, 0, 0
            for work, result in zip(batch, results):
                work.finish(result)
            self._report(batch, started, ok=True)

    def _take_out_of_service(self, error: Exception) -> None:
        with self._wake:
            self.in_service = False
            queued = list(self.pending)
            self.pending.clear()
            self.pending_cost = 0
        log.error("device taken out of service", extra={"device": str(self.device), "error": f"{type(error).__name__}: {error}",
                                                        "requeued": len(queued)})
        if self.on_out_of_service is not None:
            self.on_out_of_service(self, queued)

    def _on_device(self):
        """The worker's device made current (for calls from other threads too: warm-up)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _serving(self):
        """Inference in the serving dtype on this device."""
        stack = contextlib.ExitStack()
        stack.enter_context(self._on_device())
        stack.enter_context(torch.inference_mode())
        stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast))
        return stack

    def _device_usable(self) -> bool:
        """Probe up to PROBE_ATTEMPTS times, PROBE_PAUSE_S apart: a passing glitch is not a lost device."""
        for attempt in range(PROBE_ATTEMPTS):
            if attempt:
                time.sleep(PROBE_PAUSE_S)
            if self.probe():
                return True
        return False

    def probe(self) -> bool:
        """A tiny forward pass (one patch decoded from a zero triplane): is the device usable?"""
        c = self.model.config
        try:
            with self._on_device(), torch.inference_mode():
                zeros = Triplane(*(torch.zeros(1, *shape, device=self.device, dtype=self.dtype) for shape in (
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
        """Run one batch as a single forward pass; returns each item's result in order."""
        sizes = [len(w.clips) if w.kind == "encode" else w.triplane.batch_size for w in batch]
        if batch[0].kind == "encode":
            triplane = self.encode([w.clips for w in batch], [w.n_frames for w in batch])
            return triplane.split(sizes)
        return list(self.decode([w.triplane for w in batch], batch[0].frames).split(sizes))

    def encode(self, clips: list[torch.Tensor], n_frames: list[torch.Tensor]) -> Triplane:
        """uint8 clips [K_i, T, H, W, 3] and n_frames [K_i] (host) -> one Triplane (CPU, float32)."""
        with self._serving():
            video = from_uint8(upload(clips, self.device))
            return self.model.encode(video, upload(n_frames, self.device)).to("cpu", torch.float32)

    def decode(self, triplanes: list[Triplane], frames: tuple[int, int]) -> torch.Tensor:
        """Triplanes of K_i clips (host) and a frame range [a, b) -> uint8 [sum K_i, b - a, H, W, 3] (CPU)."""
        with self._serving():
            planes = zip(*(t.planes() for t in triplanes))
            triplane = Triplane(*(upload(list(parts), self.device, self.dtype) for parts in planes))
            return to_uint8(self.model.decode_video(triplane, frames=frames)).cpu()

    def warm_up(self) -> WarmUp:
        """Run the largest encode and decode batches the settings allow: `batch_max_frames` frames of
        whole clips (one at least), the decode over one decoder slice (the most clips one pass holds)."""
        c = self.model.config
        s = c.decode_slice_frames
        encode_clips, decode_clips = max(1, self.batch_max_frames // c.frames), max(1, self.batch_max_frames // s)
        started = time.perf_counter()
        with self._on_device():
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            clip = torch.zeros(1, c.frames, c.height, c.width, 3, dtype=torch.uint8)
            triplane = self.encode([clip.expand(encode_clips, -1, -1, -1, -1)], [torch.full((encode_clips,), c.frames)])
            self.decode([Triplane(*(p.expand(decode_clips, -1, -1, -1) for p in triplane[0].planes()))], (0, s))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        dtype = "bfloat16 (autocast)" if self.autocast else str(self.dtype).removeprefix("torch.")
        return WarmUp(str(self.device), dtype, encode_clips, decode_clips, s, time.perf_counter() - started, peak)


class Engine:
    """Model replicas on `models`' devices with their batching workers, and the admission gate.
    Keys are device names (`cuda:0`, `cpu`; `cpu:0`, `cpu:1` give several CPU replicas)."""

    def __init__(self, models: dict[str, CoordTok], batch_max_frames: int, batch_wait_ms: float,
                 max_queue: int, request_timeout_s: float, on_batch=None, compile_decoder: bool = False) -> None:
        if any(torch.device(device).type == "cuda" for device in models):
            allow_tf32_matmuls()
        self.workers = [
            DeviceWorker(model, torch.device(device), batch_max_frames, batch_wait_ms / 1000, on_batch,
                         self._requeue, compile_decoder)
            for device, model in models.items()
        ]
        self.config = next(iter(models.values())).config
        self.batch_max_frames = batch_max_frames
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
        k = self._clips_per_piece(clips.shape[1])
        pieces = [dict(clips=clips[i:i + k], n_frames=n_frames[i:i + k]) for i in range(0, len(clips), k)]
        return Triplane.cat(await self._submit("encode", [clips.shape[1] * len(p["clips"]) for p in pieces], pieces))

    async def decode(self, triplane: Triplane, frames: tuple[int, int]) -> torch.Tensor:
        """Triplane of K clips, frame range [a, b) -> uint8 [K, b - a, H, W, 3] (CPU)."""
        cost = decode_cost(self.config, frames)
        k = self._clips_per_piece(cost)
        pieces = [dict(triplane=triplane[i:i + k], frames=frames) for i in range(0, triplane.batch_size, k)]
        return torch.cat(await self._submit("decode", [cost * p["triplane"].batch_size for p in pieces], pieces))

    def _clips_per_piece(self, cost_per_clip: int) -> int:
        return max(1, self.batch_max_frames // cost_per_clip)

    async def _submit(self, kind: str, costs: list[int], pieces: list[dict]) -> list:
        """Route each piece (its cost in frames of work) and wait for all of them."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.request_timeout_s
        works = [Work(kind, cost, deadline, loop, loop.create_future(), **p) for cost, p in zip(costs, pieces)]
        for work in works:
            self._route(work)
        try:
            return await asyncio.wait_for(asyncio.gather(*(w.future for w in works)), self.request_timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"the request did not finish within {self.request_timeout_s:g} s") from None
        finally:  # failed, timed out, or the client went away: the workers skip what is left
            for work in works:
                work.future.cancel()

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
