"""Python client of the CoordTok server (httpx), sync and async.

    from service.client import Client
    with Client("http://localhost:8000") as client:
        tokens = client.encode("clip.mp4")              # Tokens: triplane of every clip + metadata
        mp4 = client.decode(tokens, frames=(0, 64))     # bytes of an H.264 MP4
        frames = client.decode_frames(tokens)           # uint8 [T, H, W, 3]

`AsyncClient` has the same methods as coroutines. Either takes an httpx `transport`, e.g.
`httpx.ASGITransport(app)` to talk to an app in the same process.
"""
from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np

from service import tokens as token_files
from service.tokens import Tokens

UPLOAD_TYPES = {".mp4": "video/mp4", ".webm": "video/webm", ".avi": "video/x-msvideo", ".mkv": "video/x-matroska", ".mov": "video/quicktime"}


class ServerError(RuntimeError):
    """The server refused a request: its status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def _headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def _encode_request(path: str | Path, fmt: str, options: dict) -> dict:
    path = Path(path)
    return {
        "url": "/v1/encode", "params": {"format": fmt, **{k: v for k, v in options.items() if v is not None}},
        "content": path.read_bytes(),
        "headers": {"content-type": UPLOAD_TYPES.get(path.suffix.lower(), "application/octet-stream")},
    }


def _decode_request(tokens: Tokens, frames: tuple[int, int] | None, fmt: str, fps: float | None) -> dict:
    params = {"format": fmt, **({"start": frames[0], "end": frames[1]} if frames else {}), **({"fps": fps} if fps else {})}
    return {"url": "/v1/decode", "params": params, "content": token_files.serialise(tokens, "safetensors"),
            "headers": {"content-type": token_files.FORMATS["safetensors"]}}


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise ServerError(response.status_code, message)
    return response


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

    def decode(self, tokens: Tokens, frames: tuple[int, int] | None = None, fmt: str = "mp4", fps: float | None = None) -> bytes:
        """Tokens -> an encoded video (mp4 or webm) or .npy bytes."""
        return _checked(self.http.post(**_decode_request(tokens, frames, fmt, fps))).content

    def decode_frames(self, tokens: Tokens, frames: tuple[int, int] | None = None) -> np.ndarray:
        """Tokens -> uint8 frames [T, H, W, 3]."""
        return np.load(io.BytesIO(self.decode(tokens, frames, fmt="npy")), allow_pickle=False)


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

    async def decode(self, tokens: Tokens, frames: tuple[int, int] | None = None, fmt: str = "mp4", fps: float | None = None) -> bytes:
        return _checked(await self.http.post(**_decode_request(tokens, frames, fmt, fps))).content

    async def decode_frames(self, tokens: Tokens, frames: tuple[int, int] | None = None) -> np.ndarray:
        return np.load(io.BytesIO(await self.decode(tokens, frames, fmt="npy")), allow_pickle=False)
