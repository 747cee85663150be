"""/v1/decode streams its answer: a 32-clip decode holds a clip or two, never the video, and its first
bytes arrive early; the deadline covers the media work; an error after the first byte cuts the
answer so that clients notice (service/streaming.py)."""
import asyncio
import hashlib
import io
import json
import logging
import threading
import time
import tracemalloc
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from coordtok.formats.tokens import Tokens, parse, plane_shapes, serialise
from coordtok.formats.geometry import plan_geometry, restore_source_size
from coordtok.formats.video import MediaLimits, read_frames
from coordtok.formats.video_write import video_bytes
from coordtok.formats.video_stream import StreamWriter
from coordtok.model import Triplane
from coordtok.service.app import create_app
from coordtok.service.client import AsyncClient, Client, IncompleteAnswer
from coordtok.service.streaming import AnswerCut
from tests.service.server_process import free_port
from tests.service.test_app import settings, weights  # noqa: F401 (the fixture)
from tests.service.test_engine import CONFIG

SAFETENSORS = {"content-type": "application/vnd.coordtok.tokens+safetensors"}
CLIPS = 32
SOURCE = (512, 512)  # restore_size: 8 x 32 = 256 frames of 512x512, 201 MB of RGB
FRAME_BYTES = SOURCE[0] * SOURCE[1] * 3
# What a streamed answer may hold at once: two clips of restored frames (12.6 MB). Buffering the
# whole restored video needs all 256 frames (201 MB), before encoding copies it once more.
BOUND_BYTES = 2 * CONFIG.frames * FRAME_BYTES


def stretched_tokens(clips: int, source: tuple[int, int] = SOURCE) -> bytes:
    """Tokens of `clips` random clips whose metadata says they were stretched from `source`."""
    generator = torch.Generator().manual_seed(clips)
    planes = [torch.randn(clips, *shape, generator=generator) for shape in plane_shapes(CONFIG).values()]
    h, w = CONFIG.height, CONFIG.width
    meta = {"n_frames": json.dumps([CONFIG.frames] * clips), "fps": "10", "source_size": json.dumps(list(source)),
            "geometry": json.dumps({"policy": "stretch", "scaled": [h, w], "crop": [0, 0, h, w], "pad": [0, 0, h, w]})}
    return serialise(Tokens(Triplane(*planes), meta), "safetensors")


def slowed_writer(monkeypatch, seconds_per_frame: float) -> None:
    """Make every frame a StreamWriter encodes take `seconds_per_frame` longer."""
    check = StreamWriter._check

    def slow_check(self, image):
        time.sleep(seconds_per_frame)
        check(self, image)

    monkeypatch.setattr(StreamWriter, "_check", slow_check)


@contextmanager
def real_server(app):
    """`app` served by uvicorn on a free loopback port, in this process (so that tests can slow
    its parts down): yields its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_32_clip_decode_holds_a_clip_or_two_and_its_first_bytes_arrive_early(weights):
    """The answer (npy restored to 512x512) is streamed: the request's peak Python memory
    (tracemalloc: numpy arrays, bytes, the answer's chunks; server and client, one process) stays
    under two clips of restored frames, while buffering the video measures more than the whole
    restored video. One engine batch holds two clips here (COORDTOK_BATCH_MAX_FRAMES = 2 clips),
    as a real server's holds 4 of 128 frames."""
    body = stretched_tokens(CLIPS)
    with TestClient(create_app(settings(weights, batch_max_frames=2 * CONFIG.frames))) as client:
        digest, received = hashlib.sha256(), 0
        tracemalloc.start()
        try:
            began = time.perf_counter()
            with client.stream("POST", "/v1/decode?format=npy&restore_size=true", content=body, headers=SAFETENSORS) as answer:
                assert answer.status_code == 200, answer.read()
                for chunk in answer.iter_bytes():
                    first = first if received else time.perf_counter() - began
                    digest.update(chunk)
                    received += len(chunk)
            total = time.perf_counter() - began
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        small = client.post("/v1/decode?format=npy", content=body, headers=SAFETENSORS)
    frames = CLIPS * CONFIG.frames
    assert int(answer.headers["content-length"]) == received == 128 + frames * FRAME_BYTES
    print(f"\n32 clips, {received / 1e6:.0f} MB streamed: peak {peak / 1e6:.1f} MB (bound {BOUND_BYTES / 1e6:.1f} MB), "
          f"first bytes after {first:.2f} s of {total:.2f} s")
    assert peak < BOUND_BYTES, peak
    assert first < total / 2, (first, total)
    # The same bytes as the buffered way: the whole video restored, then written.
    video = np.load(io.BytesIO(small.content))
    geometry = plan_geometry(SOURCE, (CONFIG.height, CONFIG.width), "stretch")
    tracemalloc.start()
    try:
        whole = video_bytes(restore_source_size(video, geometry), 10, "npy")
        _, buffered_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert hashlib.sha256(whole).digest() == digest.digest()
    assert buffered_peak > frames * FRAME_BYTES > BOUND_BYTES  # what the streamed answer avoided holding


@pytest.mark.parametrize("fmt,codec", [("mp4", "h264"), ("webm", "vp9")])
def test_streamed_videos_play_and_hold_the_frames_of_the_npy_answer(weights, fmt, codec):
    body = stretched_tokens(6, source=(40, 24))
    with TestClient(create_app(settings(weights, batch_max_frames=CONFIG.frames))) as client:
        reference = np.load(io.BytesIO(client.post("/v1/decode?format=npy&restore_size=true&start=3&end=45",
                                                   content=body, headers=SAFETENSORS).content))
        answer = client.post(f"/v1/decode?format={fmt}&restore_size=true&start=3&end=45", content=body,
                             headers=SAFETENSORS)
    assert answer.status_code == 200 and "content-length" not in answer.headers  # its size is not known ahead
    frames, info, _ = read_frames(io.BytesIO(answer.content), MediaLimits())
    assert info.codec == codec and frames.shape == reference.shape == (42, 40, 24, 3)
    assert np.abs(frames.astype(int) - reference).mean() < 12  # random tokens: noise, lossy codecs


def test_encoding_past_the_deadline_before_the_first_byte_answers_504(weights, monkeypatch):
    """mp4: libx264's lookahead keeps the first bytes back for several clips, so a deadline that
    passes while they are encoded is a refusal like any other."""
    slowed_writer(monkeypatch, 0.05)
    with TestClient(create_app(settings(weights, request_timeout_s=0.6))) as client:
        began = time.perf_counter()
        answer = client.post("/v1/decode?format=mp4", content=stretched_tokens(8), headers=SAFETENSORS)
        seconds = time.perf_counter() - began
        assert client.app.state.runtime.engine.in_system == 0
    assert answer.status_code == 504 and "did not finish within 0.6 s" in answer.json()["error"]["message"]
    assert seconds < 2.0, seconds  # stopped at the deadline's frame, not after the 64 frames (3.2 s)


def test_encoding_past_the_deadline_after_the_first_byte_cuts_the_answer(weights, monkeypatch, caplog):
    """npy: the first clip leaves at once; the deadline passes three clips later. Over HTTP the
    connection closes before the body's declared end (httpx: RemoteProtocolError; the Python
    client: IncompleteAnswer); in-process the error itself reaches the caller."""
    slowed_writer(monkeypatch, 0.05)
    caplog.set_level(logging.INFO, logger="coordtok.service")
    body = stretched_tokens(8)
    app = create_app(settings(weights, request_timeout_s=1.5))
    with real_server(app) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            with http.stream("POST", "/v1/decode?format=npy", content=body, headers=SAFETENSORS) as answer:
                assert answer.status_code == 200
                received = []
                with pytest.raises(httpx.RemoteProtocolError):
                    for chunk in answer.iter_bytes():
                        received.append(chunk)
            assert 0 < sum(map(len, received)) < int(answer.headers["content-length"])
            (cut,) = [record for record in caplog.records if record.getMessage() == "decode answer cut"]
            assert cut.request_id == answer.headers["x-request-id"] and cut.bytes_sent == sum(map(len, received))
            logged, waited = [], time.monotonic() + 10  # the request's own line too, once the server has closed
            while not logged and time.monotonic() < waited:
                logged = [record for record in caplog.records if record.getMessage() == "request"
                          and getattr(record, "request_id", None) == cut.request_id]
                time.sleep(0.05)
            assert [(record.status, record.route) for record in logged] == [(200, "/v1/decode")]
            scrape = http.get("/metrics").text
        tokens = parse(body, "safetensors", None, max_clips=CLIPS)
        with Client(url) as client, pytest.raises(IncompleteAnswer, match="cut its answer after [1-9][0-9]* bytes"):
            client.decode(tokens, fmt="npy")

        async def decode_async() -> bytes:
            async with AsyncClient(url) as client:
                return await client.decode(tokens, fmt="npy")

        with pytest.raises(IncompleteAnswer, match="cut its answer after [1-9][0-9]* bytes"):
            asyncio.run(decode_async())
        assert app.state.runtime.engine.in_system == 0  # the places are given back
    assert 'coordtok_request_failures_total{reason="DeadlineExceeded",route="/v1/decode"}' in scrape
    with TestClient(create_app(settings(weights, request_timeout_s=1.5))) as client, \
            pytest.raises(AnswerCut, match="after [1-9][0-9]* bytes: DeadlineExceeded: the request did not finish"):
        client.post("/v1/decode?format=npy", content=body, headers=SAFETENSORS)


def test_a_client_gone_mid_answer_stops_the_work_and_frees_its_place(weights, monkeypatch):
    slowed_writer(monkeypatch, 0.02)
    app = create_app(settings(weights))
    with real_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        engine = app.state.runtime.engine
        with http.stream("POST", "/v1/decode?format=npy", content=stretched_tokens(CLIPS), headers=SAFETENSORS) as answer:
            next(answer.iter_bytes())
            assert engine.in_system == 1
        deadline = time.monotonic() + 5
        while engine.in_system and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.in_system == 0  # long before the 256 frames' 5 s
        assert 'coordtok_requests_cancelled_total{route="/v1/decode"} 1.0' in http.get("/metrics").text


def test_the_restored_total_is_refused_before_any_work_naming_the_setting(weights):
    with TestClient(create_app(settings(weights, max_decode_pixels=100 * 512 * 512))) as client:
        engine, decoded = client.app.state.runtime.engine, []
        real = engine.decode
        engine.decode = lambda *args: (decoded.append(1), real(*args))[1]
        answer = client.post("/v1/decode?format=npy&restore_size=true", content=stretched_tokens(CLIPS),
                             headers=SAFETENSORS)
        assert decoded == []
        fine = client.post("/v1/decode?format=npy&restore_size=true&end=100", content=stretched_tokens(CLIPS),
                           headers=SAFETENSORS)
    message = answer.json()["error"]["message"]
    assert answer.status_code == 413 and "256 frames of 512x512" in message and "26,214,400" in message
    assert "COORDTOK_MAX_DECODE_PIXELS" in message
    assert fine.status_code == 200 and np.load(io.BytesIO(fine.content)).shape == (100, 512, 512, 3)
