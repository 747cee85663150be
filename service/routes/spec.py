"""What the OpenAPI spec says of the routes' bodies and answers (the bodies the upload routes read
themselves, streamed and bounded, declared here so that clients and fuzzers see them)."""
from __future__ import annotations

from coordtok.formats import tokens
from coordtok.formats import video_write
from coordtok.service.errors import ERROR_CONTENT

VIDEO_TYPES = {name: f.media_type for name, f in video_write.OUTPUT_FORMATS.items()}
# Query patterns of the answer formats.
VIDEO_FORMAT = "^(" + "|".join(video_write.OUTPUT_FORMATS) + ")$"
TOKEN_FORMAT = "^(" + "|".join(tokens.FORMATS) + ")$"
BINARY = {"schema": {"type": "string", "format": "binary"}}
JSON = {"application/json": {"schema": {"type": "object"}}}
_MULTIPART = {"multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}},
                                                 "required": ["file"]}}}
ENCODE_BODY = {"requestBody": {"required": True, "content": {
    **{f.media_type: BINARY for f in video_write.OUTPUT_FORMATS.values() if f.codec}, "application/octet-stream": BINARY,
    **_MULTIPART,
}}}
_PLANE = {"type": "array", "items": {"type": "array", "items": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}}}
DECODE_BODY = {"requestBody": {"required": True, "content": {
    tokens.FORMATS["safetensors"]: BINARY, tokens.FORMATS["npz"]: BINARY,
    tokens.FORMATS["json"]: {"schema": {"type": "object", "required": ["xy", "yt", "xt"], "properties": {
        "xy": _PLANE, "yt": _PLANE, "xt": _PLANE, "metadata": {"type": "object"}}}},
    **_MULTIPART,
}}}
# What each refusal means; every one answers {"error": {"type", "message"}}.
REFUSALS = {
    400: "a multipart body that cannot be parsed",
    401: "a missing or wrong API key (when the server has keys)",
    404: "no such job, result or route",
    408: "the body did not arrive in time (COORDTOK_BODY_TIMEOUT_S, COORDTOK_BODY_MIN_RATE)",
    409: "the job has no results (yet)",
    413: "over a limit: body size, frames, clips, streams, frame size or answer pixels",
    415: "not a video FFmpeg reads, or an unsupported token content type",
    422: "invalid parameters, a damaged video or tokens this model cannot decode",
    503: "the queue is full, the server is starting or stopping, or a device ran out of memory (with Retry-After)",
    504: "the request did not finish within COORDTOK_REQUEST_TIMEOUT_S",
}
UPLOAD_REFUSALS = (400, 401, 408, 413, 415, 422, 503, 504)


def answers(*refusals: int, ok: dict[int, dict | None] | None = None) -> dict:
    """The `responses` of a route for the OpenAPI spec: its refusals, and its successes by status
    (`ok={200: {"video/mp4": ...}}`: content types; None: no body)."""
    documented = {status: {"description": REFUSALS[status], "content": ERROR_CONTENT} for status in refusals}
    for status, content in (ok or {}).items():
        documented[status] = {"description": "success", **({"content": content} if content is not None else {})}
    return documented
