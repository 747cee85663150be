"""Engine work: one piece of a request, waiting on a replica's queue or running in its batch.

`Engine.encode` and `Engine.decode` cut a request into pieces of whole clips, an `EncodeWork` or a
`DecodeWork` each. Pieces with the same `batch_key` run together as one forward pass:
`run_batch(batch, replica)` runs them and returns each piece's share, in order. Batched results
equal unbatched ones: clips never interact in CoordTok's encoder or decoder.

`cost` is the frames of work a piece holds, what batches and routing count: an encode counts every
frame of its clips, a decode every frame of the decoder slices it computes (a frame range is decoded
in whole slices, see `CoordTok.decode_video`).
"""
from __future__ import annotations

import asyncio
import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from coordtok.model import Triplane
from coordtok.model.config import CoordTokConfig


class Replica(Protocol):
    """What a batch needs of the replica that runs it (`DeviceWorker`)."""

    def encode(self, clips: list[torch.Tensor], n_frames: list[torch.Tensor]) -> Triplane: ...

    def decode(self, triplanes: list[Triplane], frames: tuple[int, int]) -> torch.Tensor: ...


def decode_cost(config: CoordTokConfig, frames: tuple[int, int]) -> int:
    """Frames one clip's decode of [a, b) computes: the whole decoder slices that overlap it."""
    s = config.decode_slice_frames
    first, stop = frames[0] // s * s, -(-frames[1] // s) * s
    return min(stop, config.frames) - first


@dataclass(eq=False)
class Work(ABC):
    """A piece of one request (EncodeWork or DecodeWork). `submit` binds it to the request's event loop and deadline; the
    worker settles its future with `finish`."""

    kind: ClassVar[str]  # "encode" or "decode": the metrics' label
    deadline: float = field(init=False, default=math.inf)  # time.monotonic() after which it is dropped
    loop: asyncio.AbstractEventLoop = field(init=False)
    future: asyncio.Future = field(init=False)

    @property
    @abstractmethod
    def cost(self) -> int:
        """The frames of work the piece holds (module docstring)."""

    @property
    def batch_key(self) -> tuple:
        """Pieces with equal keys may share a forward pass."""
        return (self.kind,)

    @classmethod
    @abstractmethod
    def run_batch(cls, batch: list[Work], replica: Replica) -> list:
        """Run `batch` (pieces of this kind, with one batch key) as one forward pass on `replica`."""

    def submit(self, loop: asyncio.AbstractEventLoop, deadline: float) -> asyncio.Future:
        """Bind the piece to the request awaiting it on `loop`; returns the future it settles."""
        self.loop, self.deadline, self.future = loop, deadline, loop.create_future()
        return self.future

    def finish(self, result=None, error: BaseException | None = None) -> None:
        """Hand the request its result or error (from a worker thread)."""
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


@dataclass(eq=False)
class EncodeWork(Work):
    """Clips to encode: `clips` uint8 [K, T, H, W, 3] and `n_frames` [K] (host)."""

    clips: torch.Tensor
    n_frames: torch.Tensor
    kind: ClassVar[str] = "encode"

    @property
    def cost(self) -> int:
        return self.clips.shape[0] * self.clips.shape[1]

    @classmethod
    def run_batch(cls, batch: list[EncodeWork], replica: Replica) -> list[Triplane]:
        triplane = replica.encode([w.clips for w in batch], [w.n_frames for w in batch])
        return triplane.split([len(w.clips) for w in batch])


@dataclass(eq=False)
class DecodeWork(Work):
    """The frame range `frames` [a, b) of every clip of `triplane` (host), each clip costing
    `clip_cost` frames of work (`decode_cost`)."""

    triplane: Triplane
    frames: tuple[int, int]
    clip_cost: int
    kind: ClassVar[str] = "decode"

    @property
    def cost(self) -> int:
        return self.clip_cost * self.triplane.batch_size

    @property
    def batch_key(self) -> tuple:
        return (self.kind, self.frames)

    @classmethod
    def run_batch(cls, batch: list[DecodeWork], replica: Replica) -> list[torch.Tensor]:
        video = replica.decode([w.triplane for w in batch], batch[0].frames)
        return list(video.split([w.triplane.batch_size for w in batch]))
