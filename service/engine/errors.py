"""How engine work can fail (the status each answers with: service/errors.py)."""
from __future__ import annotations

import torch

# CUDA errors after which the device's context is unusable: every later call on it fails too.
STICKY_DEVICE_ERRORS = (
    "illegal memory access", "illegal address", "device-side assert", "unspecified launch failure",
    "misaligned address", "illegal instruction", "invalid program counter", "hardware stack error",
    "uncorrectable ecc error", "launch timed out", "gpu is lost", "device lost", "cuda-capable device",
)


class EngineError(Exception):
    """Engine work that failed."""


class QueueFull(EngineError):
    """Too many requests in the system; retry later."""


class DeadlineExceeded(EngineError):
    """The request waited past its deadline."""


class NotReady(EngineError):
    """The server is starting, draining or has no device in service."""


class DeviceFailure(EngineError):
    """The batch holding this request failed on its device: it ran out of memory or was lost (a
    retry may succeed), or the model failed on a usable device."""

    def __init__(self, message: str, out_of_memory: bool = False, device_lost: bool = False) -> None:
        super().__init__(message)
        self.out_of_memory, self.device_lost = out_of_memory, device_lost

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
