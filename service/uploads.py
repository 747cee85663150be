"""Request bodies the upload routes read themselves: the raw body, or the multipart field `file`.

The body is read once as it arrives (bounded in size and time by the app's body middleware) and
written straight where it goes: a video to a temporary file in `upload_dir`, a token file to
memory. Multipart bodies are parsed as they stream (python-multipart's parser, the one Starlette
uses), so nothing is spooled to the system's temporary folder first.
"""
from __future__ import annotations

import errno
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request


class UploadError(Exception):
    """A body that cannot be read as sent (400 malformed multipart, 422 empty or no `file`
    field, 503 no room on disk)."""

    def __init__(self, message: str, http_status: int = 422) -> None:
        super().__init__(message)
        self.http_status = http_status


@dataclass
class Upload:
    """What arrived: the bytes (in memory or at `path`), and the content type and file name the
    client gave them (the part's own for multipart; the file name is '' for a raw body)."""

    content_type: str
    filename: str = ""
    data: bytes = b""
    path: Path | None = None


async def save_upload(request: Request, directory: Path | None) -> Upload:
    """Stream the body (raw, or the multipart field `file`) to a temporary file in `directory`
    (None: the system's temp folder). The file is removed on any failure, a client that went
    away included; otherwise the caller removes it. A full disk is an UploadError 503."""
    handle = tempfile.NamedTemporaryFile(prefix="coordtok-", suffix=".upload", dir=directory, delete=False)
    path = Path(handle.name)
    try:
        with handle:
            upload = await _receive(request, handle.write)
        if path.stat().st_size == 0:
            raise UploadError("the upload is empty: send a video file")
    except OSError as error:
        path.unlink(missing_ok=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise UploadError("the server has no room for the upload right now; retry later", 503) from None
        raise
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    upload.path = path
    return upload


async def read_upload(request: Request) -> Upload:
    """The body (raw, or the multipart field `file`) in memory."""
    chunks: list[bytes] = []
    upload = await _receive(request, chunks.append)
    upload.data = b"".join(chunks)
    return upload


async def _receive(request: Request, write: Callable[[bytes], object]) -> Upload:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        async for chunk in request.stream():
            write(chunk)
        return Upload(content_type)
    _, options = parse_options_header(content_type)
    if not options.get(b"boundary"):
        raise UploadError("a multipart/form-data body needs a boundary parameter in its Content-Type", 400)
    field = _FileField(write)
    parser = MultipartParser(options[b"boundary"], callbacks=field.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
    except MultipartParseError as error:
        raise UploadError(f"the multipart body is malformed: {error}", 400) from None
    if not field.ended:
        raise UploadError("the multipart body ends before its closing boundary (cut short?)", 400)
    if not field.found:
        raise UploadError("send the file in the multipart field 'file'")
    return Upload(field.content_type, field.filename)


class _FileField:
    """Callbacks for python-multipart's parser: the data of the part named `file` goes to
    `write` as it is parsed; other parts are skipped unread; a second `file` part is refused."""

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self.write = write
        self.found = self.ended = self.in_file = False
        self.content_type = self.filename = ""
        self._headers: dict[bytes, bytes] = {}
        self._name = self._value = b""

    def callbacks(self) -> dict:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_end": self._end}

    def _part_begin(self) -> None:
        self._headers, self.in_file = {}, False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._name.lower()] = self._value
        self._name = self._value = b""

    def _headers_finished(self) -> None:
        _, disposition = parse_options_header(self._headers.get(b"content-disposition", b""))
        self.in_file = disposition.get(b"name") == b"file"
        if not self.in_file:
            return
        if self.found:
            raise UploadError("send one file, in the multipart field 'file'", 400)
        self.found = True
        self.content_type = self._headers.get(b"content-type", b"").decode("latin-1")
        self.filename = disposition.get(b"filename", b"").decode("utf-8", "replace")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.write(data[start:end])

    def _end(self) -> None:
        self.ended = True
