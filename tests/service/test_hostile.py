"""Hostile traffic (issue 15): each attack an outside probe made, repeated here bounded in size and
time, against a real `coordtok serve` on loopback where memory or connections are the point (its
peak resident memory read from /proc, the peak reset before each attack) and through the ASGI app
where what is counted is inside the server. Each asserts the answer, that other clients are still
served, and, against the real server, the peak memory growth and that /metrics stays flat."""
import asyncio
import io
import os
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from fractions import Fraction
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from coordtok.model import Triplane
from coordtok.service import middleware
from coordtok.formats import video as media
from coordtok.formats.geometry import plan_geometry, restore_source_size
from coordtok.formats.video_write import write_video
from coordtok.service.app import create_app
from coordtok.formats.tokens import Tokens, plane_shapes, serialise
from tests.service.server_process import ROOT, peak_growth, server_process
from tests.service.test_app import video_file
from tests.service.test_engine import CONFIG
from tests.service.test_faults import settings
from tests.formats.test_video import encode, raw_h264

VIDEO = {"content-type": "video/mp4"}
SAFETENSORS = {"content-type": "application/vnd.coordtok.tokens+safetensors"}
NPZ = {"content-type": "application/x-npz"}
MAX_QUEUE, MAX_CLIPS, MAX_STREAMS = 4, 4, 3
MAX_DECODE_PIXELS = 8 * 256 * 256
# Growth of the server's peak resident memory allowed per attack: a few decoded frames and
# buffers. Each attack cost hundreds of MB to GB on the server the probe attacked.
MEMORY_BOUND_MB = 80
# Growth of /metrics allowed per attack: a few new label sets (a status, a failure reason).
METRICS_BOUND_BYTES = 4096


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """(URL, process) of `coordtok serve` with the tiny tokenizer and small limits."""
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "uploads").mkdir()
    env = {"COORDTOK_MODEL": str(models[0]), "COORDTOK_GENERATOR": "none", "COORDTOK_JOBS_DIR": str(folder / "jobs"),
           "COORDTOK_UPLOAD_DIR": str(folder / "uploads"), "COORDTOK_MAX_QUEUE": str(MAX_QUEUE),
           "COORDTOK_BODY_TIMEOUT_S": "3", "COORDTOK_HEADER_TIMEOUT_S": "1", "COORDTOK_MAX_STREAMS": str(MAX_STREAMS),
           "COORDTOK_MAX_CLIPS": str(MAX_CLIPS), "COORDTOK_MAX_DECODE_PIXELS": str(MAX_DECODE_PIXELS)}
    with server_process(folder / "server.log", env) as (url, process):
        yield url, process
    assert list((folder / "uploads").iterdir()) == []  # every temporary upload was removed


def still_serving(url: str) -> None:
    """Another client's encode and decode succeed, and the server reports ready."""
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/readyz").status_code == 200
        tokens = client.post("/v1/encode", content=video_file(8), headers=VIDEO)
        assert tokens.status_code == 200, tokens.text
        video = client.post("/v1/decode?format=npy", content=tokens.content, headers=SAFETENSORS)
        assert video.status_code == 200, video.text


def metrics_size(url: str) -> int:
    return len(httpx.get(f"{url}/metrics").content)


def attack(url: str, process, requests) -> tuple[list[httpx.Response], dict]:
    """Send `requests` ((method, path, content, headers)) one after another; returns the answers
    and the server's peak memory growth during them. Asserts that other clients are then served
    and that /metrics stayed flat."""
    still_serving(url)  # the label sets of ordinary requests exist before the measure
    scrape = metrics_size(url)
    with httpx.Client(base_url=url, timeout=60) as client, peak_growth(process.pid) as memory:
        answers = [client.request(method, path, content=content, headers=headers) for method, path, content, headers in requests]
    still_serving(url)
    grown = metrics_size(url) - scrape
    print(f"hostile: {len(requests)} requests, server peak +{memory['growth_mb']:.1f} MB, /metrics +{grown} bytes")
    assert grown < METRICS_BOUND_BYTES
    return answers, memory


def random_planes(clips: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(clips)
    return [torch.randn(clips, *shape, generator=generator) for shape in plane_shapes(CONFIG).values()]


def token_file(clips: int = 1, fmt: str = "safetensors", **metadata) -> bytes:
    meta = {"n_frames": json.dumps([CONFIG.frames] * clips), **metadata}
    return serialise(Tokens(Triplane(*random_planes(clips)), meta), fmt)


# 1. Held admission slots ---------------------------------------------------------------------


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def test_slow_bodies_hold_no_queue_place_and_end_with_408(server):
    """More connections than max_queue send their headers and then little or nothing of the body
    (declared lengths and chunked): encode and decode are still served while they hang, and each
    slow request is answered 408 at the body deadline (3 s here) with its connection closed."""
    url, process = server
    still_serving(url)
    scrape = metrics_size(url)
    slow = []
    for k in range(2 * MAX_QUEUE):
        sock = connect(url)
        if k % 2:
            sock.sendall(b"POST /v1/decode HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")
        else:
            sock.sendall(b"POST /v1/encode HTTP/1.1\r\nHost: t\r\nContent-Type: video/mp4\r\n"
                         b"Content-Length: 100000\r\n\r\n" + b"\0" * 10)
        slow.append(sock)
    time.sleep(0.5)  # the slow requests are in the app, reading their bodies
    still_serving(url)
    for sock in slow:
        answer = read_until_closed(sock)  # returns once the server closes the connection
        sock.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"connection: close" in head.lower()
        assert json.loads(body)["error"]["type"] == "BodyTimeout"
    still_serving(url)
    assert metrics_size(url) - scrape < METRICS_BOUND_BYTES


def test_a_body_below_the_minimum_rate_gets_408_before_the_body_deadline(models, tmp_path, monkeypatch):
    """1 byte per 0.1 s against a minimum rate of 1 kB/s counted from 0.2 s: 408 long before the
    60 s body deadline, and the route never got the body."""
    monkeypatch.setattr(middleware, "_BODY_RATE_GRACE_S", 0.2)
    app = create_app(settings(models, tmp_path, generator="none", body_timeout_s=60, body_min_rate=1000))
    sent = 0

    async def trickle():
        nonlocal sent
        for _ in range(600):  # 60 s at this rate, unless the server stops reading
            sent += 1
            yield b"\0"
            await asyncio.sleep(0.1)

    async def run():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                return await client.post("/v1/encode", content=trickle(), headers=VIDEO)

    response = asyncio.run(run())
    assert response.status_code == 408 and response.json()["error"]["type"] == "BodyTimeout"
    assert "1000 bytes/s" in response.json()["error"]["message"]
    assert sent < 30


# 2. npz metadata bombs -----------------------------------------------------------------------


def npz_with(member: str, write) -> bytes:
    """A token .npz with valid planes, plus `member` written by `write(zipfile)`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, plane in zip(("xy", "yt", "xt"), random_planes(1)):
            payload = io.BytesIO()
            np.save(payload, plane.numpy())
            archive.writestr(f"{name}.npy", payload.getvalue())
        write(archive, member)
    return buffer.getvalue()


def string_bomb(compression: int, mebibytes: int = 256):
    """Writes a member whose .npy header declares one string of `mebibytes` MiB (a 0-d '<U'
    array, as the metadata is), followed by that many zeros: it compresses to almost nothing
    (bzip2: 200 bytes, deflate: 260 kB), and read whole it costs the server that and more."""

    def write(archive, member):
        info = zipfile.ZipInfo(member + ".npy")
        info.compress_type = compression
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": f"<U{(mebibytes << 20) // 4}", "fortran_order": False, "shape": ()})
        with archive.open(info, "w", force_zip64=True) as f:
            f.write(header.getvalue())
            for _ in range(mebibytes):
                f.write(bytes(1 << 20))

    return write


def huge_declared_shape(archive, member):  # an .npy header claiming (2^40,) float64: 8 TiB
    payload = io.BytesIO()
    np.lib.format.write_array_header_1_0(payload, {"descr": "<f8", "fortran_order": False, "shape": (1 << 40,)})
    archive.writestr(member + ".npy", payload.getvalue())


def many_members(archive, member):
    for k in range(5000):
        archive.writestr(f"{member}{k}", b"")


def test_npz_members_are_bounded_before_they_are_read(server):
    url, process = server
    bombs = {
        "bzip2 metadata": (npz_with("__metadata__", string_bomb(zipfile.ZIP_BZIP2)), "zip method 12"),
        "deflated metadata": (npz_with("__metadata__", string_bomb(zipfile.ZIP_DEFLATED)), "declares 268435584 bytes"),
        "declared shape 2^40": (npz_with("__metadata__", huge_declared_shape), "0-d str array"),
        "5000 members": (npz_with("junk", many_members), "lists 5003 members"),
    }
    answers, memory = attack(url, process, [("POST", "/v1/decode", body, NPZ) for body, _ in bombs.values()])
    for (name, (body, message)), answer in zip(bombs.items(), answers):
        assert len(body) < 1_000_000, name
        assert answer.status_code == 422, (name, answer.status_code, answer.text[:300])
        assert message in answer.json()["error"]["message"], (name, answer.json())
    assert memory["growth_mb"] < MEMORY_BOUND_MB, memory


# 3. restore_size without a total bound -------------------------------------------------------


def restorable(source: tuple[int, int], clips: int = 1) -> bytes:
    """Tokens whose metadata says the video was stretched from `source` (so restorable)."""
    h, w = CONFIG.height, CONFIG.width
    return token_file(clips, source_size=json.dumps(list(source)),
                      geometry=json.dumps({"policy": "stretch", "scaled": [h, w], "crop": [0, 0, h, w], "pad": [0, 0, h, w]}))


def test_restored_answers_are_bounded_before_decoding(server):
    url, process = server
    cases = [(restorable((2048, 2048)), "npy", 8, 2048), (restorable((4096, 4096), clips=2), "npy", 16, 4096),
             (restorable((4096, 4096), clips=2), "mp4", 16, 4096)]
    answers, memory = attack(url, process, [("POST", f"/v1/decode?restore_size=true&format={fmt}", body, SAFETENSORS)
                                            for body, fmt, _, _ in cases])
    for (body, _, frames, side), answer in zip(cases, answers):
        assert len(body) < 50_000
        assert answer.status_code == 413, answer.text[:300]
        message = answer.json()["error"]["message"]
        assert f"{frames} frames of {side}x{side}" in message and f"{MAX_DECODE_PIXELS:,}" in message
    assert memory["growth_mb"] < MEMORY_BOUND_MB, memory
    with httpx.Client(base_url=url) as client:  # within the bound: restored
        fine = client.post("/v1/decode?restore_size=true&format=npy", content=restorable((64, 48)), headers=SAFETENSORS)
    assert fine.status_code == 200 and np.load(io.BytesIO(fine.content)).shape == (8, 64, 48, 3)


def test_restore_size_on_cropped_tokens_fails_before_any_decoding(models, tmp_path):
    with TestClient(create_app(settings(models, tmp_path, generator="none"))) as client:
        cropped = client.post("/v1/encode", content=video_file(8, h=24, w=32), headers=VIDEO).content
        engine, decoded = client.app.state.runtime.engine, []
        real = engine.decode
        engine.decode = lambda *args: (decoded.append(1), real(*args))[1]
        response = client.post("/v1/decode?restore_size=true", content=cropped, headers=SAFETENSORS)
    assert response.status_code == 422 and "resize=pad" in response.json()["error"]["message"]
    assert decoded == []


# 4. Metrics cardinality ----------------------------------------------------------------------


def test_metrics_label_route_templates_not_raw_paths(models, tmp_path):
    """2,000 distinct unknown paths and job ids requested with a wrong key: /metrics grows by a
    few label sets, and no requested path appears in it."""
    with TestClient(create_app(settings(models, tmp_path, generator="none", api_keys=["right-key"]))) as client:
        wrong = {"authorization": "Bearer wrong-key"}
        client.get("/v1/nothing", headers=wrong)
        client.get("/v1/jobs/0", headers=wrong)
        before = client.get("/metrics").text
        for k in range(1000):
            assert client.get(f"/v1/unknown-{k}", headers=wrong).status_code == 401
            assert client.get(f"/v1/jobs/secret-job-{k}", headers=wrong).status_code == 401
        after = client.get("/metrics").text
    print(f"hostile: 2,000 refused requests to distinct paths, /metrics {len(before)} -> {len(after)} bytes")
    assert len(after) - len(before) < 1000  # the same label sets, counted higher (4 MB before the fix)
    assert "secret-job" not in after and "unknown-" not in after
    assert 'coordtok_requests_total{route="unmatched",status="401"} 1001.0' in after
    assert 'coordtok_requests_total{route="/v1/jobs/{job_id}",status="401"} 1001.0' in after


# 5. Clip limit checked from the header, decoding stopped at the crossing frame ---------------


def counting_frames(monkeypatch) -> list[int]:
    """Count the frames media converts to RGB (every decoded output frame passes there)."""
    converted = []
    real = media._Scaler.__call__
    monkeypatch.setattr(media._Scaler, "__call__", lambda self, frame: (converted.append(1), real(self, frame))[1])
    return converted


def test_the_clip_limit_is_checked_from_the_header_then_at_the_crossing_frame(models, tmp_path, monkeypatch):
    limit = 2 * CONFIG.frames  # max_clips 2
    long_mp4 = io.BytesIO()
    encode(long_mp4, np.zeros((2000, 16, 16, 3), np.uint8), fps=25, fmt="mp4")  # the header says 2,000 frames
    raw = raw_h264(16, 16, 200, 40)  # no header count
    converted = counting_frames(monkeypatch)
    with TestClient(create_app(settings(models, tmp_path, generator="none", max_clips=2))) as client:
        from_header = client.post("/v1/encode", content=long_mp4.getvalue(), headers=VIDEO)
        header_frames = len(converted)
        while_decoding = client.post("/v1/encode", content=raw, headers={"content-type": "application/octet-stream"})
        decoded_frames = len(converted) - header_frames
        fits = client.post("/v1/encode", content=raw_h264(16, 16, limit, 40), headers={"content-type": "application/octet-stream"})
    print(f"hostile: clip limit {limit} frames: {header_frames} frames decoded (header says 2000), "
          f"{decoded_frames} (raw stream of 200)")
    assert from_header.status_code == 413 and header_frames == 0
    assert "makes 250 clips of 8 frames" in from_header.json()["error"]["message"]
    assert while_decoding.status_code == 413 and decoded_frames == limit  # stopped at the frame past the limit
    assert "more than 2 clips" in while_decoding.json()["error"]["message"]
    assert fits.status_code == 200


# 6. Streams besides the decoded one ----------------------------------------------------------


def many_streams(big: int, side: int = 2048) -> bytes:
    """An MKV whose first stream is 8 frames of 64x64 video, followed by `big` streams of one
    black side x side frame each (FFmpeg probes every stream when it opens a file)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        streams = []
        for size in [64] + [side] * big:
            stream = container.add_stream("libx264", rate=Fraction(8), options={"preset": "ultrafast"})
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            streams.append(stream)
        for k in range(8):
            container.mux(streams[0].encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), 10 * k, np.uint8), format="rgb24")))
        for stream in streams[1:]:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((side, side, 3), np.uint8), format="rgb24")))
        for stream in streams:
            container.mux(stream.encode(None))
    return buffer.getvalue()


def test_files_with_more_streams_than_the_limit_are_refused_unprobed(server):
    """20 extra 2048x2048 streams (probing them all costs ~200 MB): 413 within the memory bound;
    with extra streams within the limit, only the first video stream is decoded."""
    url, process = server
    crowded = many_streams(20)
    answers, memory = attack(url, process, [("POST", "/v1/encode?format=json", crowded, {"content-type": "video/x-matroska"})])
    assert len(crowded) < 500_000
    assert answers[0].status_code == 413 and f"more than {MAX_STREAMS} streams" in answers[0].json()["error"]["message"]
    assert memory["growth_mb"] < MEMORY_BOUND_MB, memory
    with httpx.Client(base_url=url) as client:
        fine = client.post("/v1/encode?format=json", content=many_streams(MAX_STREAMS - 1, side=256),
                           headers={"content-type": "video/x-matroska"})
    assert fine.status_code == 200 and fine.json()["metadata"]["n_frames"] == [8]
    assert fine.json()["metadata"]["source_size"] == [64, 64]


# 7. Media work under the deadline, stopped by a disconnect ------------------------------------


def slowed_frames(monkeypatch, seconds: float) -> list[int]:
    converted = []
    real = media._Scaler.__call__

    def slow(self, frame):
        converted.append(1)
        time.sleep(seconds)
        return real(self, frame)

    monkeypatch.setattr(media._Scaler, "__call__", slow)
    return converted


def test_media_decoding_stops_at_the_request_deadline(models, tmp_path, monkeypatch):
    """200 frames at 50 ms each would take 10 s; the deadline is 1 s: 504, decoding stopped."""
    body = raw_h264(16, 16, 200, 40)
    converted = slowed_frames(monkeypatch, 0.05)
    with TestClient(create_app(settings(models, tmp_path, generator="none", request_timeout_s=1, max_clips=100))) as client:
        response = client.post("/v1/encode", content=body, headers={"content-type": "application/octet-stream"})
        stopped_at = len(converted)
        time.sleep(0.5)
        assert len(converted) == stopped_at  # nothing goes on decoding in the background
        monkeypatch.undo()
        assert client.post("/v1/encode", content=video_file(8), headers=VIDEO).status_code == 200
    assert response.status_code == 504 and "within 1 s" in response.json()["error"]["message"]
    assert stopped_at < 100


def test_media_decoding_stops_when_the_client_disconnects(models, tmp_path, monkeypatch):
    body = raw_h264(16, 16, 200, 40)
    converted = slowed_frames(monkeypatch, 0.05)
    app = create_app(settings(models, tmp_path, generator="none", max_clips=100))
    disconnect = asyncio.Event()

    async def run():
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():  # the upload, then the client leaves after 0.5 s
            if messages:
                return messages.pop(0)
            await disconnect.wait()
            return {"type": "http.disconnect"}

        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/encode", "raw_path": b"/v1/encode", "query_string": b"",
                 "headers": [(b"content-type", b"application/octet-stream")], "http_version": "1.1", "scheme": "http",
                 "server": ("t", 80), "client": ("t", 1), "root_path": ""}
        async with app.router.lifespan_context(app):
            asyncio.get_running_loop().call_later(0.5, disconnect.set)
            await app(scope, receive, send)
            gone_at = len(converted)
            await asyncio.sleep(0.5)
            return sent, gone_at, len(converted)

    sent, gone_at, later = asyncio.run(run())
    assert sent[0]["status"] == 499
    assert later <= gone_at + 1 < 100  # at most the frame in progress finished after the client left


def test_long_media_encoding_stops_when_asked():
    calls = []

    def stop_after_three():
        calls.append(1)
        if len(calls) > 3:
            raise TimeoutError("stop")

    frames = np.zeros((50, 16, 16, 3), np.uint8)
    with pytest.raises(TimeoutError):
        write_video(frames, io.BytesIO(), 25, check_stop=stop_after_three)
    resized = plan_geometry((32, 32), (16, 16), "stretch")
    with pytest.raises(TimeoutError):
        calls.clear()
        restore_source_size(frames, resized, check_stop=stop_after_three)
    assert len(calls) == 4


# 9. Headers must arrive in time ---------------------------------------------------------------


def test_connections_that_do_not_send_their_headers_in_time_are_closed(server):
    """Silent, and a header line every 0.4 s (each byte used to restart uvicorn's keep-alive
    timer): both closed after the 1 s header deadline; a normal kept-alive client is served."""
    url, _ = server
    silent, drip = connect(url), connect(url)
    closed = threading.Event()

    def dripping():
        try:
            drip.sendall(b"GET /healthz HTTP/1.1\r\n")
            for k in range(60):  # 24 s of headers unless the server closes first
                time.sleep(0.4)
                drip.sendall(f"X-Drip-{k}: 1\r\n".encode())
        except OSError:  # the server closed the connection
            closed.set()

    thread = threading.Thread(target=dripping)
    thread.start()
    assert read_until_closed(silent) == b""  # closed without an answer
    thread.join(timeout=30)
    assert closed.is_set()
    with httpx.Client(base_url=url) as client:  # keep-alive: two requests on one connection
        assert client.get("/healthz").status_code == 200 and client.get("/healthz").status_code == 200
    still_serving(url)


# 10. Byte-identical results across processes ---------------------------------------------------

_WRITE_RESULTS = """
import hashlib, io, json, sys
import numpy as np, torch
from coordtok.model import Triplane
from coordtok.formats.video_write import write_video
from coordtok.formats.tokens import Tokens, serialise
frames = np.random.default_rng(0).integers(0, 256, (6, 33, 48, 3), dtype=np.uint8)
planes = [torch.from_numpy(np.random.default_rng(k).standard_normal((1, 4, 4, 4)).astype(np.float32)) for k in range(3)]
meta = {key: str(k) for k, key in enumerate("model_id weights_sha256 frames_per_clip n_frames source_fps fps source_size geometry".split())}
digests = {}
for codec in ("h264", "vp9"):
    buffer = io.BytesIO()
    write_video(frames, buffer, 24, codec=codec)
    digests[codec] = hashlib.sha256(buffer.getvalue()).hexdigest()
for fmt in ("safetensors", "npz", "json"):
    digests[fmt] = hashlib.sha256(serialise(Tokens(Triplane(*planes), meta), fmt)).hexdigest()
print(json.dumps(digests))
"""


def test_results_are_byte_identical_across_processes():
    """mp4, webm and the three token formats, written by three processes (each with its own
    hash seed, which ordered safetensors metadata)."""
    runs = [json.loads(subprocess.run([sys.executable, "-c", _WRITE_RESULTS], cwd=ROOT, check=True, capture_output=True,
                                      text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": str(seed)}).stdout)
            for seed in (1, 2, 3)]
    assert runs[0] == runs[1] == runs[2]


# 11. One fps range at encode and decode -------------------------------------------------------


def test_one_frame_rate_range_at_encode_and_decode(models, tmp_path):
    fast = io.BytesIO()
    encode(fast, np.zeros((8, 16, 16, 3), np.uint8), fps=1200, fmt="mp4")
    with TestClient(create_app(settings(models, tmp_path, generator="none"))) as client:
        refused = client.post("/v1/encode", content=fast.getvalue(), headers=VIDEO)
        resampled = client.post("/v1/encode?fps=1000", content=fast.getvalue(), headers=VIDEO)
        decoded = client.post("/v1/decode", content=resampled.content, headers=SAFETENSORS)  # at the metadata's fps
        too_slow = client.post("/v1/decode?fps=0.0001", content=resampled.content, headers=SAFETENSORS)
        slowest = client.post("/v1/decode?fps=0.1", content=resampled.content, headers=SAFETENSORS)
        too_fast = client.post("/v1/encode?fps=1001", content=video_file(8), headers=VIDEO)
    assert refused.status_code == 415 and "pass fps" in refused.json()["error"]["message"]
    assert resampled.status_code == 200 and decoded.status_code == 200
    assert media.probe(io.BytesIO(decoded.content)).fps == pytest.approx(1000)
    assert too_slow.status_code == 422 and too_fast.status_code == 422
    assert slowest.status_code == 200 and media.probe(io.BytesIO(slowest.content)).fps == pytest.approx(0.1)


# 12. Multipart uploads go nowhere but upload_dir ------------------------------------------------


def test_multipart_uploads_are_written_only_inside_upload_dir(models, tmp_path, monkeypatch):
    """A 3 MB multipart upload (past Starlette's 1 MB in-memory spool): every temporary file made
    while it is received lies in upload_dir."""
    import starlette.formparsers

    uploads = tmp_path / "uploads"
    uploads.mkdir()
    made = []
    for module in (tempfile, starlette.formparsers):
        for name in ("SpooledTemporaryFile", "NamedTemporaryFile", "TemporaryFile", "mkstemp"):
            if hasattr(module, name):
                real = getattr(module, name)
                monkeypatch.setattr(module, name, lambda *a, _real=real, **kw: (made.append(kw.get("dir")), _real(*a, **kw))[1])
    padding = np.random.default_rng(0).bytes(3_000_000)
    video = video_file(8)
    with TestClient(create_app(settings(models, tmp_path, generator="none", upload_dir=uploads))) as client:
        response = client.post("/v1/encode", files={"file": ("clip.mp4", video + padding, "video/mp4")})
    assert response.status_code == 200, response.text  # MP4 ignores trailing bytes
    assert made and all(Path(folder) == uploads for folder in made), made


def test_decode_accepts_multipart_like_encode(models, tmp_path):
    with TestClient(create_app(settings(models, tmp_path, generator="none"))) as client:
        tokens = client.post("/v1/encode?format=npz", content=video_file(8), headers=VIDEO).content
        by_name = client.post("/v1/decode?format=npy", files={"file": ("clip.npz", tokens, "application/octet-stream")})
        by_type = client.post("/v1/decode?format=npy", files={"file": ("t", tokens, "application/x-npz")})
        raw = client.post("/v1/decode?format=npy", content=tokens, headers=NPZ)
        missing = client.post("/v1/decode", files={"other": ("clip.npz", tokens, "application/x-npz")})
    assert by_name.status_code == by_type.status_code == raw.status_code == 200
    assert by_name.content == by_type.content == raw.content
    assert missing.status_code == 422 and "'file'" in missing.json()["error"]["message"]


# 14. Huge images -----------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height, with one row of data (FFmpeg reads the size)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = zlib.compress(b"\0" + bytes(3 * min(width, 64)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", row) + chunk(b"IEND", b""))


def test_a_huge_png_is_413_and_a_small_one_a_one_frame_video(models, tmp_path):
    small = io.BytesIO()
    encode(small, np.full((1, 24, 32, 3), 90, np.uint8), codec="png", pix_fmt="rgb24", fmt="image2pipe")
    with TestClient(create_app(settings(models, tmp_path, generator="none"))) as client:
        huge = client.post("/v1/encode", content=png_header(30000, 30000), headers={"content-type": "image/png"})
        one = client.post("/v1/encode?format=json", content=small.getvalue(), headers={"content-type": "image/png"})
    assert huge.status_code == 413 and "30000x30000" in huge.json()["error"]["message"]
    assert one.status_code == 200 and one.json()["metadata"]["n_frames"] == [1]


# Issue 16: a damaged video stream is named as such ---------------------------------------------


def test_a_damaged_video_stream_is_not_called_audio_only(tmp_path):
    path = tmp_path / "av.mp4"
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=10)
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        for k in range(5):
            container.mux(video.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), 9 * k, np.uint8), format="rgb24")))
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            samples.sample_rate, samples.pts = 16000, 1024 * k
            container.mux(audio.encode(samples))
        container.mux(video.encode(None))
        container.mux(audio.encode(None))
    data = bytearray(path.read_bytes())
    data[data.index(b"mdia")] ^= 0xFF  # the video track's media box becomes unreadable
    with pytest.raises(media.CorruptMedia, match="video stream is damaged"):
        media.read_frames(io.BytesIO(bytes(data)))


# 13. The OpenAPI spec describes the server (schemathesis with every check: test_fuzz.py) -----


def test_a_405_names_every_method_of_the_path(models, tmp_path):
    with TestClient(create_app(settings(models, tmp_path, generator="none"))) as client:
        response = client.put("/v1/jobs/0123")
        spec = client.get("/openapi.json").json()
    assert response.status_code == 405 and response.headers["allow"] == "DELETE, GET"
    assert response.json()["error"]["type"] == "HTTPError"
    assert set(spec["paths"]["/v1/jobs/{job_id}"]) == {"get", "delete"}
    assert "404" in spec["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]
    assert "400" in spec["paths"]["/v1/encode"]["post"]["responses"]
    assert list(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]


def test_metadata_that_is_not_utf8_is_read_not_a_500():
    """Found while damaging MP4s for the test above: PyAV decodes container metadata strictly."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        container.metadata["title"] = "TITLETITLE"
        stream = container.add_stream("libx264", rate=10)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        for _ in range(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")))
        container.mux(stream.encode(None))
    damaged = buffer.getvalue().replace(b"TITLETITLE", b"\xff\xfe\xfdTLETITLE")
    frames, _, _ = media.read_frames(io.BytesIO(damaged))
    assert frames.shape == (3, 16, 16, 3)
