"""/v1/decode's answer, made and sent clip by clip.

The clips a request asks for are decoded through the engine in order, a window at a time (as many
clips as one engine batch holds, one at least), the next window decoding while this one is written.
Each clip is restored to the source size (`restore_size`) and encoded one frame at a time on the
answer's own thread (`formats.video_stream.StreamWriter`: fragmented MP4, WebM, or .npy with its
header first), and its bytes leave as the writer hands them out. So a request holds two windows of
decoded clips at the model's size, one restored frame and a chunk of the file, never the video; the
first bytes leave once the first clip is written.

The request's deadline (`RequestClock`) bounds all of it: every wait on the engine, the media work
frame by frame, and every send (a client that stops reading is cut). Errors before the first byte are refusals like any other (the answer starts
only once its first bytes are made), with their statuses. After it the status (200) has been sent:
the answer is cut, the connection closed without finishing the body (no last chunk of the chunked
body; for npy, fewer bytes than its Content-Length), which every HTTP client reports (httpx:
`RemoteProtocolError`; the Python client raises `IncompleteAnswer`). The server logs why and counts
it in `coordtok_request_failures_total` under the error's type.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import numpy as np
import torch
from fastapi import Request
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse

from coordtok.formats.geometry import Geometry, restored_frames
from coordtok.formats.video_stream import StreamWriter
from coordtok.model import Triplane
from coordtok.service.engine import Engine
from coordtok.service.clock import RequestClock, unless_disconnected
from coordtok.service.engine.work import decode_cost
from coordtok.service.metrics import Metrics

log = logging.getLogger("coordtok.service")
ROUTE = "/v1/decode"
# One piece of a decode (`ClipLayout.pieces`): clip k, its frame range [a, b), the frames kept.
Piece = tuple[int, tuple[int, int], torch.Tensor]


class AnswerCut(Exception):
    """The answer failed after its first bytes were sent: the connection is closed unfinished."""


class DecodeStream:
    """The answer to one decode: `pieces` of `triplane`'s clips, restored with `geometry` (None:
    at the model's size), as a file of format `fmt` at `fps`. It owns `held` (the request's place in
    the engine) and gives it back when it closes."""

    def __init__(self, engine: Engine, triplane: Triplane, pieces: list[Piece], geometry: Geometry | None,
                 writer: StreamWriter, clock: RequestClock, metrics: Metrics, held: ExitStack) -> None:
        self.engine, self.triplane, self.pieces, self.geometry = engine, triplane, pieces, geometry
        self.writer, self.clock, self.metrics, self.held = writer, clock, metrics, held
        config = engine.model_config  # a window: the whole clips one engine batch decodes
        self.window = engine.clips_per_batch(decode_cost(config, (0, config.frames)))
        self.sent = 0  # bytes handed to the server
        self.finished = False  # the last bytes are made
        self.seconds = {"inference": 0.0, "media_encode": 0.0}  # waiting on the engine; media work
        self._decoding: set[asyncio.Future] = set()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coordtok-answer")
        self._chunks = self._produce()

    async def answer(self, request: Request, media_type: str) -> StreamedAnswer:
        """Make the first bytes (what fails before them is refused with its status, and a client
        gone meanwhile stops the work), then the answer that sends them and the rest."""
        try:
            first = await unless_disconnected(request, self._first_chunk(), self.metrics, ROUTE,
                                              on_gone=self.clock.mark_gone)
        except BaseException:
            await self.close()
            raise
        return StreamedAnswer(self, first, media_type)

    async def close(self) -> None:
        """End the work however the answer ended: decodes still queued are cancelled, media work
        stops at its next frame, the encoder is released and the request's place is given back."""
        for decoding in self._decoding:
            if decoding.done() and not decoding.cancelled():
                decoding.exception()  # a failure nobody awaits any more is not an error to log
            decoding.cancel()
        self._decoding.clear()
        self.clock.mark_gone()  # the media thread stops at its next check
        try:
            await asyncio.wrap_future(self._thread.submit(self.writer.close))  # after the work in progress
        finally:
            self._thread.shutdown(wait=False)
            self.held.close()
        if self.finished:
            for phase, seconds in self.seconds.items():
                self.metrics.phase.labels(ROUTE, phase).observe(seconds)

    async def body(self, first: bytes) -> AsyncIterator[bytes]:
        """`first`, then the rest of the file as it is made."""
        self.sent += len(first)
        yield first
        async for chunk in self._chunks:
            self.sent += len(chunk)
            yield chunk

    async def _first_chunk(self) -> bytes:
        async for chunk in self._chunks:
            if chunk:
                return chunk
        return b""

    async def _produce(self) -> AsyncIterator[bytes]:
        """The file's bytes: each clip restored and encoded as it is decoded, then the file's end."""
        async for clip in self._decoded():
            frames = clip if self.geometry is None else restored_frames(clip, self.geometry)
            chunks = self.writer.encode(frames, self.clock.check)
            while (chunk := await self._in_thread(next, chunks, None)) is not None:
                yield chunk
        self.clock.check()
        last = await self._in_thread(self.writer.finish)
        self.finished = True
        yield last

    async def _decoded(self) -> AsyncIterator[np.ndarray]:
        """Each piece's frames, uint8 [n, H, W, 3] in order; the next window decodes meanwhile."""
        windows = [self.pieces[i:i + self.window] for i in range(0, len(self.pieces), self.window)]
        ahead = self._submit(windows[0])
        for j, window in enumerate(windows):
            current, ahead = ahead, self._submit(windows[j + 1]) if j + 1 < len(windows) else []
            for decoding, (_, _, index) in zip(current, window):
                clip = await self._in_time(decoding)
                self.metrics.tokens.labels("decode").inc(self.engine.model_config.tokens)
                yield clip[0][index].numpy()

    def _submit(self, window: list[Piece]) -> list[asyncio.Future]:
        decoding = [asyncio.ensure_future(self.engine.decode(self.triplane[k], frames)) for k, frames, _ in window]
        self._decoding.update(decoding)
        return decoding

    async def _in_time(self, decoding: asyncio.Future) -> torch.Tensor:
        """The decoded clip, within the request's deadline."""
        began = time.perf_counter()
        try:
            return await self.clock.within(decoding)
        finally:
            self._decoding.discard(decoding)
            self.seconds["inference"] += time.perf_counter() - began

    async def _in_thread(self, function, *args):
        """`function(*args)` on the answer's thread: media work, one chunk at a time and in order."""
        began = time.perf_counter()
        try:
            return await asyncio.wrap_future(self._thread.submit(function, *args))
        finally:
            self.seconds["media_encode"] += time.perf_counter() - began


class StreamedAnswer(StreamingResponse):
    """A DecodeStream's answer: status 200, its first chunk, then the rest as it is made (npy with
    its Content-Length, video formats chunked). An error on the way cuts it (`AnswerCut`)."""

    def __init__(self, stream: DecodeStream, first: bytes, media_type: str) -> None:
        length = stream.writer.content_length
        super().__init__(stream.body(first), media_type=media_type,
                         headers=None if length is None else {"content-length": str(length)})
        self.stream = stream

    async def __call__(self, scope, receive, send) -> None:
        async def send_in_time(message) -> None:  # a client that stops reading is cut at the deadline
            await self.stream.clock.within(send(message))

        try:
            await super().__call__(scope, receive, send_in_time)
            gone = not self.stream.finished  # the body stopped early without an error: a disconnect
        except ClientDisconnect:
            gone = True
        except Exception as error:
            reason = type(error).__name__
            self.stream.metrics.failures.labels(ROUTE, reason).inc()
            log.error("decode answer cut", extra={"request_id": scope.get("state", {}).get("request_id"), "route": ROUTE,
                                                  "bytes_sent": self.stream.sent, "error": f"{reason}: {error}"})
            raise AnswerCut(f"the answer was cut after {self.stream.sent} bytes: {reason}: {error}") from error
        finally:
            await self.stream.close()
        if gone:
            self.stream.metrics.cancelled.labels(ROUTE).inc()
