"""One model replica on one device, and the thread that runs its batches.

The worker thread (on CUDA, with its device made current first: Triton and CUDA launch on the
thread's current device) takes batches from its `BatchQueue` and runs each as one forward pass in
the serving dtype (bf16 autocast on GPUs that support it; fp32 matmuls may use TF32 on CUDA), then
hands each request its share. Uploads to a GPU go through pinned host memory without blocking the
thread. `compile_decoder` compiles the decoder with `torch.compile` (the Triton sampling kernel
stays as it is).

Failures: a failed batch fails its requests (`DeviceFailure`), then the worker probes its device
with a one-patch decode (up to PROBE_ATTEMPTS times, PROBE_PAUSE_S apart), routing avoiding it
meanwhile. A non-recoverable device error (a sticky CUDA error such as an illegal address or a
device-side assert, after which every call on that device fails) or a probe that keeps failing
takes the replica out of service for good: `on_out_of_service` gets the work still queued on it.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from coordtok.model import CoordTok, Triplane
from coordtok.model.triplane import from_uint8, to_uint8
from coordtok.service.engine.batching import BatchQueue
from coordtok.service.engine.errors import DeviceFailure
from coordtok.service.engine.work import Work

log = logging.getLogger("coordtok.engine")

PROBE_ATTEMPTS, PROBE_PAUSE_S = 3, 0.5


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
    """A model replica on one device, its queue, and the thread that runs its batches."""

    def __init__(self, model: CoordTok, device: torch.device, batch_max_frames: int, batch_wait_s: float,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 on_out_of_service: Callable[[DeviceWorker, list[Work]], None] | None = None,
                 compile_decoder: bool = False) -> None:
        self.model, self.device, self.batch_max_frames = model, device, batch_max_frames
        self.on_batch, self.on_out_of_service = on_batch, on_out_of_service
        self.dtype = next(model.parameters()).dtype
        self.autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()  # the serving dtype: bf16
        if compile_decoder:
            model.decoder.compile(dynamic=True)  # compiled at the first call (the warm-up)
        self.queue = BatchQueue(batch_max_frames, batch_wait_s)
        self.running = 0  # requests in the batch running now
        self.running_cost = 0  # frames of work in it
        self.healthy = True  # the last batch succeeded, or the probe after it passed
        self.in_service = True  # false for good after a non-recoverable failure
        self._thread: threading.Thread | None = None

    @property
    def pending_cost(self) -> int:
        """Frames of work queued."""
        return self.queue.cost

    @property
    def load(self) -> int:
        """Frames of work queued plus running: what routing balances."""
        return self.queue.cost + self.running_cost

    @property
    def state(self) -> str:
        if not self.in_service:
            return "out of service"
        return "serving" if self.healthy else "probing"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"coordtok-{self.device}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the thread (after the batch it runs); work still queued is left."""
        self.queue.stop()
        if self._thread is not None:
            self._thread.join()

    def put(self, work: Work) -> bool:
        """Queue work; False (nothing queued) once the replica is out of service."""
        return self.queue.put(work)

    def run(self, batch: list[Work]) -> list:
        """Run one batch as a single forward pass; returns each item's result in order."""
        return type(batch[0]).run_batch(batch, self)

    def _loop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while self.in_service and (batch := self.queue.take()) is not None:
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: list[Work]) -> None:
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
            return
        self.healthy, self.running, self.running_cost = True, 0, 0
        for work, result in zip(batch, results):
            work.finish(result)
        self._report(batch, started, ok=True)

    def _take_out_of_service(self, error: Exception) -> None:
        self.in_service = False
        queued = self.queue.close()
        log.error("device taken out of service", extra={"device": str(self.device), "error": f"{type(error).__name__}: {error}",
                                                        "requeued": len(queued)})
        if self.on_out_of_service is not None:
            self.on_out_of_service(self, queued)

    def _report(self, batch: list[Work], started: float, ok: bool, out_of_memory: bool = False) -> None:
        if self.on_batch is not None:
            self.on_batch(BatchStats(str(self.device), batch[0].kind, len(batch), sum(w.cost for w in batch),
                                     time.perf_counter() - started, ok, out_of_memory))

    # ---- on the device

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
