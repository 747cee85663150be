"""Python client of the CoordTok server (httpx), sync and async.

    from coordtok.service.client import Client
    with Client("http://localhost:8000") as client:
        tokens = client.encode("clip.mp4")              # Tokens: triplane of every clip + metadata
        mp4 = client.decode(tokens, frames=(0, 64))     # bytes of an H.264 MP4
        frames = client.decode_frames(tokens)           # uint8 [T, H, W, 3]
        job = client.generate(num_videos=4, steps=50)   # a job (dict); generation runs on the server
        job = client.wait(job["id"])                    # polls until it has finished
        mp4 = client.result(job["id"], 0)               # bytes of video 0

`AsyncClient` has the same methods as coroutines. Either takes an httpx `transport`, e.g.
`httpx.ASGITransport(app)` to talk to an app in the same process. A refusal raises `ServerError`
(its status and message); a decode the server cuts after its first bytes (it streams its video and
failed on the way) raises `IncompleteAnswer`.
"""
from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

from coordtok.formats import tokens as token_files
from coordtok.formats.tokens import Tokens
from coordtok.formats.video_write import UPLOAD_TYPES


class ServerError(RuntimeError):
    """The server refused a request: its status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class IncompleteAnswer(RuntimeError):
    """The server started an answer (a decode streams its video) and closed the connection before
    its end: the work failed after the first bytes were sent (past the deadline, a device failure,
    the server stopping). The server's log says why, under the request id."""

    def __init__(self, response: httpx.Response, received: int) -> None:
        request_id = response.headers.get("x-request-id", "?")
        super().__init__(f"the server cut its answer after {received} bytes (request id {request_id}); the "
                         "decode failed after it had started sending: its log says why; retry, or ask for fewer frames")
        self.received, self.request_id = received, request_id


# What httpx raises when a connection closes in the middle of a body.
_CUT = (httpx.RemoteProtocolError, httpx.ReadError)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def _encode_request(path: str | Path, fmt: str, options: dict) -> dict:
    path = Path(path)
    return {
        "url": "/v1/encode", "params": {"format": fmt, **{k: v for k, v in options.items() if v is not None}},
        "content": path.read_bytes(),
        "headers": {"content-type": UPLOAD_TYPES.get(path.suffix.lower().removeprefix("."), "application/octet-stream")},
    }


def _decode_request(tokens: Tokens, frames: tuple[int, int] | None, fmt: str, fps: float | None, restore_size: bool) -> dict:
    params = {"format": fmt, **({"start": frames[0], "end": frames[1]} if frames else {}), **({"fps": fps} if fps else {}),
              **({"restore_size": "true"} if restore_size else {})}
    return {"url": "/v1/decode", "params": params, "content": token_files.serialise(tokens, "safetensors"),
            "headers": {"content-type": token_files.FORMATS["safetensors"]}}


FINISHED = ("succeeded", "failed", "cancelled")


def _generate_request(options: dict, idempotency_key: str | None) -> dict:
    return {"url": "/v1/generate", "json": {k: v for k, v in options.items() if v is not None},
            "headers": {"idempotency-key": idempotency_key} if idempotency_key else {}}


def _jobs_params(limit: int, cursor: str | None, status: str | None) -> dict:
    return {"limit": limit, **({"cursor": cursor} if cursor else {}), **({"status": status} if status else {})}


def _cancelled(response: httpx.Response) -> dict | None:
    return None if _checked(response).status_code == 204 else response.json()


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise ServerError(response.status_code, message)
    return response


def _streamed_body(response: httpx.Response) -> bytes:
    """The whole body of a streamed `response` (refusals raise ServerError); IncompleteAnswer when
    the server cuts it."""
    if response.status_code >= 400:
        response.read()
        _checked(response)
    parts = []
    try:
        for chunk in response.iter_bytes():
            parts.append(chunk)
    except _CUT:
        raise IncompleteAnswer(response, sum(map(len, parts))) from None
    return b"".join(parts)


async def _astreamed_body(response: httpx.Response) -> bytes:
    """`_streamed_body` of an async response."""
    if response.status_code >= 400:
        await response.aread()
        _checked(response)
    parts = []
    try:
        async for chunk in response.aiter_bytes():
            parts.append(chunk)
    except _CUT:
        raise IncompleteAnswer(response, sum(map(len, parts))) from None
    return b"".join(parts)


def _tokens(response: httpx.Response) -> Tokens:
    return token_files.parse(response.content, "safetensors", None, max_clips=1 << 20)


class Client:
    def __init__(self, base_url: str = "http://localhost:8000", api_key: str | None = None,
                 timeout: float = 600.0, transport: httpx.BaseTransport | None = None) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=timeout, headers=_headers(api_key), transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()

    def encode(self, path: str | Path, resize: str = "crop", fps: float | None = None,
               start: float | None = None, end: float | None = None) -> Tokens:
        """A video file -> the tokens of its clips."""
        request = _encode_request(path, "safetensors", {"resize": resize, "fps": fps, "start": start, "end": end})
        return _tokens(_checked(self.http.post(**request)))

    def decode(self, tokens: Tokens, frames: tuple[int, int] | None = None, fmt: str = "mp4", fps: float | None = None,
               restore_size: bool = False) -> bytes:
        """Tokens -> an encoded video (mp4 or webm) or .npy bytes; `restore_size`: at the source's
        size (tokens of a pad or stretch encode). The server streams the video as it decodes it:
        IncompleteAnswer when it fails after the first bytes."""
        with self.http.stream("POST", **_decode_request(tokens, frames, fmt, fps, restore_size)) as response:
            return _streamed_body(response)

    def decode_frames(self, tokens: Tokens, frames: tuple[int, int] | None = None) -> np.ndarray:
        """Tokens -> uint8 frames [T, H, W, 3]."""
        return np.load(io.BytesIO(self.decode(tokens, frames, fmt="npy")), allow_pickle=False)

    def generate(self, num_videos: int = 1, steps: int = 50, sampler: str = "euler", seed: int | None = None,
                 guidance: float = 1.0, class_label: int | None = None, fmt: str = "mp4", fps: float | None = None,
                 idempotency_key: str | None = None) -> dict:
        """Create a generation job; returns the job (`id`, `status`, `progress`, ...). The same
        `idempotency_key` with the same arguments returns the same job."""
        options = dict(num_videos=num_videos, steps=steps, sampler=sampler, seed=seed, guidance=guidance,
                       class_label=class_label, format=fmt, fps=fps)
        return _checked(self.http.post(**_generate_request(options, idempotency_key))).json()

    def job(self, job_id: str) -> dict:
        return _checked(self.http.get(f"/v1/jobs/{job_id}")).json()

    def jobs(self, limit: int = 20, cursor: str | None = None, status: str | None = None) -> dict:
        """A page of jobs, newest first: {"jobs": [...], "next_cursor": str | None}."""
        return _checked(self.http.get("/v1/jobs", params=_jobs_params(limit, cursor, status))).json()

    def cancel(self, job_id: str) -> dict | None:
        """Cancel a queued or running job (returns it); delete a finished one and its results (None)."""
        return _cancelled(self.http.delete(f"/v1/jobs/{job_id}"))

    def result(self, job_id: str, k: int) -> bytes:
        """Video k of a succeeded job (mp4, webm, or a token file)."""
        return _checked(self.http.get(f"/v1/jobs/{job_id}/results/{k}")).content

    def wait(self, job_id: str, poll_s: float = 0.5, timeout_s: float | None = None,
             on_progress: Callable[[dict], None] | None = None) -> dict:
        """Poll the job until it has finished (succeeded, failed or cancelled); returns it.
        `on_progress(job)` sees every poll. TimeoutError after `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["status"] in FINISHED:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout_s:g} s")
            time.sleep(poll_s)


class AsyncClient:
    def __init__(self, base_url: str = "http://localhost:8000", api_key: str | None = None,
                 timeout: float = 600.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=timeout, headers=_headers(api_key), transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    async def encode(self, path: str | Path, resize: str = "crop", fps: float | None = None,
                     start: float | None = None, end: float | None = None) -> Tokens:
        request = _encode_request(path, "safetensors", {"resize": resize, "fps": fps, "start": start, "end": end})
        return _tokens(_checked(await self.http.post(**request)))

    async def decode(self, tokens: Tokens, frames: tuple[int, int] | None = None, fmt: str = "mp4", fps: float | None = None,
                     restore_size: bool = False) -> bytes:
        async with self.http.stream("POST", **_decode_request(tokens, frames, fmt, fps, restore_size)) as response:
            return await _astreamed_body(response)

    async def decode_frames(self, tokens: Tokens, frames: tuple[int, int] | None = None) -> np.ndarray:
        return np.load(io.BytesIO(await self.decode(tokens, frames, fmt="npy")), allow_pickle=False)

    async def generate(self, num_videos: int = 1, steps: int = 50, sampler: str = "euler", seed: int | None = None,
                       guidance: float = 1.0, class_label: int | None = None, fmt: str = "mp4", fps: float | None = None,
                       idempotency_key: str | None = None) -> dict:
        options = dict(num_videos=num_videos, steps=steps, sampler=sampler, seed=seed, guidance=guidance,
                       class_label=class_label, format=fmt, fps=fps)
        return _checked(await self.http.post(**_generate_request(options, idempotency_key))).json()

    async def job(self, job_id: str) -> dict:
        return _checked(await self.http.get(f"/v1/jobs/{job_id}")).json()

    async def jobs(self, limit: int = 20, cursor: str | None = None, status: str | None = None) -> dict:
        return _checked(await self.http.get("/v1/jobs", params=_jobs_params(limit, cursor, status))).json()

    async def cancel(self, job_id: str) -> dict | None:
        return _cancelled(await self.http.delete(f"/v1/jobs/{job_id}"))

    async def result(self, job_id: str, k: int) -> bytes:
        return _checked(await self.http.get(f"/v1/jobs/{job_id}/results/{k}")).content

    async def wait(self, job_id: str, poll_s: float = 0.5, timeout_s: float | None = None,
                   on_progress: Callable[[dict], None] | None = None) -> dict:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = await self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["status"] in FINISHED:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout_s:g} s")
            await asyncio.sleep(poll_s)
