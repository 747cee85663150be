"""The HTTP API against the real app with a small model: every route, format and error path."""
import asyncio
import shutil
import subprocess
import threading
import time
import io
import json

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors

from coordtok.model import CoordTok, save_model
from coordtok.service.app import create_app
from coordtok.service.routes import tokens as routes_tokens
from coordtok.formats.video import MediaLimits, read_frames
from coordtok.formats.video_write import write_video
from coordtok.service.settings import Settings
from tests.service.test_engine import CONFIG
from tests.system_tools import require


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "small.safetensors"
    save_model(CoordTok(CONFIG), path)
    return path


def settings(weights, **overrides) -> Settings:
    return Settings(**{"model": str(weights), "devices": ["cpu"], "batch_wait_ms": 0, **overrides})


def video_file(frames: int = 20, h: int = 24, w: int = 32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(frames)[:, None, None, None]
    y, x = np.arange(h)[None, :, None, None], np.arange(w)[None, None, :, None]
    clip = 127 + 100 * np.sin(0.3 * x + 0.2 * y - 0.4 * t + rng.uniform(0, 6, 3))
    buffer = io.BytesIO()
    write_video(clip.astype(np.uint8), buffer, fps=10)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(weights):
    with TestClient(create_app(settings(weights))) as c:
        yield c


def test_health_readiness_and_models(client):
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {"ready": True}
    (entry,) = client.get("/v1/models").json()["models"]
    assert entry["token_shape"] == {"xy": [4, 4, 4], "yt": [8, 4, 4], "xt": [8, 4, 4]} and entry["devices"] == ["cpu"]


def test_encode_returns_tokens_of_every_clip_with_metadata(client):
    response = client.post("/v1/encode", content=video_file(20), headers={"content-type": "video/mp4"})
    assert response.status_code == 200, response.text
    tensors = load_safetensors(response.content)
    assert tensors["xy"].shape == (3, 4, 4, 4)  # 20 frames -> full clips at frames 0, 8 and 12
    header_len = int.from_bytes(response.content[:8], "little")
    meta = json.loads(response.content[8 : 8 + header_len])["__metadata__"]
    assert json.loads(meta["n_frames"]) == [8, 8, 8] and json.loads(meta["clip_starts"]) == [0, 8, 12]
    assert meta["clip_policy"] == "stretch" and meta["source_size"] == "[24, 32]"


@pytest.mark.parametrize("fmt", ["npz", "json"])
def test_encode_formats_and_multipart_upload(client, fmt):
    files = {"file": ("clip.mp4", video_file(8), "video/mp4")}
    response = client.post(f"/v1/encode?format={fmt}", files=files)
    assert response.status_code == 200, response.text
    back = client.post("/v1/decode?format=npy", content=response.content, headers={"content-type": response.headers["content-type"]})
    assert back.status_code == 200, back.text
    assert np.load(io.BytesIO(back.content)).shape == (8, 16, 16, 3)


def test_decode_mp4_is_playable_and_frame_ranges_equal_a_full_decode(client):
    tokens = client.post("/v1/encode", content=video_file(20), headers={"content-type": "video/mp4"}).content
    kind = {"content-type": "application/vnd.coordtok.tokens+safetensors"}
    full = np.load(io.BytesIO(client.post("/v1/decode?format=npy", content=tokens, headers=kind).content))
    assert full.shape == (20, 16, 16, 3) and full.dtype == np.uint8
    part = np.load(io.BytesIO(client.post("/v1/decode?format=npy&start=6&end=13", content=tokens, headers=kind).content))
    assert np.array_equal(part, full[6:13])
    mp4 = client.post("/v1/decode", content=tokens, headers=kind)
    assert mp4.headers["content-type"] == "video/mp4"
    frames, _, _ = read_frames(io.BytesIO(mp4.content), MediaLimits())
    assert frames.shape == (20, 16, 16, 3)


@pytest.mark.parametrize("body,status,message", [
    (b"", 422, "empty"),
    (b"this is not a video at all" * 10, 415, ""),
])
def test_bad_uploads_get_clear_errors(client, body, status, message):
    response = client.post("/v1/encode", content=body, headers={"content-type": "video/mp4"})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    assert client.get("/readyz").status_code == 200


def test_bad_tokens_and_ranges_get_clear_errors(client):
    kind = {"content-type": "application/vnd.coordtok.tokens+safetensors"}
    tokens = client.post("/v1/encode", content=video_file(8), headers={"content-type": "video/mp4"}).content
    assert client.post("/v1/decode?start=5&end=9", content=tokens, headers=kind).status_code == 422
    assert client.post("/v1/decode", content=tokens[:100], headers=kind).status_code == 422
    assert client.post("/v1/decode", content=tokens, headers={"content-type": "text/plain"}).status_code == 415
    nan = json.dumps({"xy": [[[[float("nan")] * 4] * 4] * 4], "yt": [[[[0.0] * 4] * 4] * 8], "xt": [[[[0.0] * 4] * 4] * 8]})
    response = client.post("/v1/decode", content=nan, headers={"content-type": "application/json"})
    assert response.status_code == 422 and "NaN" in response.json()["error"]["message"]


def test_uploads_over_the_limit_get_413(weights):
    with TestClient(create_app(settings(weights, max_upload_bytes=1000))) as c:
        response = c.post("/v1/encode", content=video_file(20), headers={"content-type": "video/mp4"})
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]


def test_concurrent_requests_are_batched_and_equal_sequential_ones(weights):
    app = create_app(settings(weights, batch_wait_ms=300))
    bodies = [video_file(8, seed=s) for s in range(3)]

    async def run():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                post = lambda b: c.post("/v1/encode", content=b, headers={"content-type": "video/mp4"})
                together = await asyncio.gather(*(post(b) for b in bodies))
                one_by_one = [await post(b) for b in bodies]
                scrape = (await c.get("/metrics")).text
        return together, one_by_one, scrape

    together, one_by_one, scrape = asyncio.run(run())
    for a, b in zip(together, one_by_one):
        torch.testing.assert_close(load_safetensors(a.content)["xy"], load_safetensors(b.content)["xy"], rtol=1e-5, atol=1e-5)
    value = lambda name: next(float(x.split()[-1]) for x in scrape.splitlines() if x.startswith(name))
    single = value('coordtok_batch_size_bucket{kind="encode",le="1.0"}')
    batches = value('coordtok_batch_size_count{kind="encode"}')
    assert single < batches  # at least one batch held more than one request


def test_sync_client_against_a_running_server(weights, tmp_path):
    import socket
    import threading
    import time

    import uvicorn

    from coordtok.service.client import Client, ServerError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings(weights)), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        (tmp_path / "clip.mp4").write_bytes(video_file(12))
        with Client(f"http://127.0.0.1:{port}") as client:
            tokens = client.encode(tmp_path / "clip.mp4")
            assert tokens.clips == 2 and tokens.metadata["n_frames"] == "[8, 8]"
            assert tokens.metadata["clip_starts"] == "[0, 4]"
            assert client.decode_frames(tokens, frames=(3, 11)).shape == (8, 16, 16, 3)
            with pytest.raises(ServerError, match="422"):
                client.decode_frames(tokens, frames=(0, 40))
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_api_keys_guard_every_route_but_health_and_metrics(weights, caplog):
    import logging

    with TestClient(create_app(settings(weights, api_keys=["s3cret-key"]))) as c, caplog.at_level(logging.INFO, "coordtok.service"):
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200
        assert c.get("/v1/models").status_code == 401
        wrong = c.get("/v1/models", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        ok = c.get("/v1/models", headers={"authorization": "Bearer s3cret-key", "x-request-id": "abc-123"})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "abc-123"
    assert "s3cret-key" not in caplog.text
    assert any(getattr(r, "request_id", None) == "abc-123" and r.status == 200 for r in caplog.records)


def test_json_log_lines_carry_the_request_fields():
    import logging

    from coordtok.service.logs import JsonFormatter

    record = logging.LogRecord("coordtok.service", logging.INFO, __file__, 1, "request", (), None)
    record.request_id, record.status = "r1", 503
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "r1" and line["status"] == 503 and line["level"] == "info"


def test_decode_restores_the_source_size_unless_cropped(client):
    kind = {"content-type": "application/vnd.coordtok.tokens+safetensors"}
    padded = client.post("/v1/encode?resize=pad", content=video_file(8, h=24, w=32), headers={"content-type": "video/mp4"}).content
    frames = np.load(io.BytesIO(client.post("/v1/decode?format=npy&restore_size=true", content=padded, headers=kind).content))
    assert frames.shape == (8, 24, 32, 3)
    cropped = client.post("/v1/encode", content=video_file(8, h=24, w=32), headers={"content-type": "video/mp4"}).content
    response = client.post("/v1/decode?format=npy&restore_size=true", content=cropped, headers=kind)
    assert response.status_code == 422 and "resize=pad" in response.json()["error"]["message"]


def test_metrics_pass_promtool_check(client):
    require(shutil.which("promtool"), "promtool", "apt-get install prometheus; .ci/run installs it")
    client.post("/v1/encode", content=video_file(8), headers={"content-type": "video/mp4"})
    client.get("/v1/models")
    scrape = client.get("/metrics")
    assert scrape.headers["content-type"].startswith("text/plain")
    result = subprocess.run(["promtool", "check", "metrics"], input=scrape.text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for family in ("coordtok_requests_total", "coordtok_request_duration_seconds_bucket", "coordtok_batch_size_bucket",
                   "coordtok_frames_processed_total", "coordtok_model_load_seconds", "coordtok_ready", "coordtok_model_info",
                   'coordtok_request_body_bytes_count{route="/v1/encode"}', 'coordtok_requests_running{device="cpu"}',
                   "coordtok_build_info"):
        assert family in scrape.text, family


def test_resolution_over_the_limit_is_refused_from_the_header(weights):
    with TestClient(create_app(settings(weights, max_width=16, max_height=16))) as c:
        response = c.post("/v1/encode", content=video_file(8, h=24, w=32), headers={"content-type": "video/mp4"})
    assert response.status_code == 413 and "32" in response.json()["error"]["message"]


def test_a_video_longer_than_the_limit_is_encoded_in_a_range_that_ends_within_it(weights):
    """A 3 s upload to a server whose limit is 2 s: refused whole (413, saying how to fix it), and
    its first 1.6 s (16 frames, two clips) encoded with end=1.6; a range ending past 2 s is refused."""
    with TestClient(create_app(settings(weights, max_duration_s=2.0))) as c:
        upload = lambda query: c.post(f"/v1/encode?format=json{query}", content=video_file(30), headers={"content-type": "video/mp4"})
        whole = upload("")
        assert whole.status_code == 413
        assert whole.json()["error"]["message"] == ("the video lasts 3.0 s, over the limit of 2 s; cut it into shorter "
                                                    "parts or ask for a part that ends by 2 s")
        part = upload("&end=1.6")
        assert part.status_code == 200 and part.json()["metadata"]["n_frames"] == [8, 8]
        past = upload("&start=1&end=2.5")
        assert past.status_code == 413 and "the part asked for ends at 2.5 s" in past.json()["error"]["message"]


def test_a_full_queue_answers_503_with_retry_after(weights):
    app = create_app(settings(weights, max_queue=1))
    body = video_file(8)

    async def run():
        release = threading.Event()
        async with app.router.lifespan_context(app):
            worker = app.state.runtime.engine.workers[0]
            real_run = worker.run
            worker.run = lambda batch: (release.wait(30), real_run(batch))[1]  # the first request holds its place
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                first = asyncio.ensure_future(c.post("/v1/encode", content=body, headers={"content-type": "video/mp4"}))
                for _ in range(500):
                    await asyncio.sleep(0.01)
                    if "coordtok_queue_size 1.0" in (await c.get("/metrics")).text:
                        break
                second = await c.post("/v1/encode", content=body, headers={"content-type": "video/mp4"})
                release.set()
                return await first, second

    first, second = asyncio.run(run())
    assert first.status_code == 200
    assert second.status_code == 503 and second.headers["retry-after"] == "1"
    assert "limit is 1" in second.json()["error"]["message"]


def test_a_client_that_disconnects_frees_its_queued_work(weights):
    """Raw ASGI: the upload arrives, then the client goes away while its work waits behind a
    slow batch; the work is cancelled (never run) and counted."""
    app = create_app(settings(weights))
    body = video_file(8)

    async def run():
        async with app.router.lifespan_context(app):
            worker = app.state.runtime.engine.workers[0]
            real_run, ran = worker.run, []
            worker.run = lambda batch: (ran.append(len(batch)), time.sleep(0.5), real_run(batch))[2]
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                blocker = asyncio.ensure_future(c.post("/v1/encode", content=body, headers={"content-type": "video/mp4"}))
                await asyncio.sleep(0.2)
                messages = [{"type": "http.request", "body": body, "more_body": False}]

                async def receive():  # the upload, then the client is gone
                    return messages.pop(0) if messages else {"type": "http.disconnect"}

                sent = []

                async def send(message):
                    sent.append(message)

                scope = {"type": "http", "method": "POST", "path": "/v1/encode", "raw_path": b"/v1/encode",
                         "query_string": b"", "headers": [(b"content-type", b"video/mp4")], "http_version": "1.1",
                         "scheme": "http", "server": ("test", 80), "client": ("test", 1), "root_path": ""}
                await app(scope, receive, send)
                await blocker
                await asyncio.sleep(0.7)  # the worker would have taken the cancelled work by now
                scrape = (await c.get("/metrics")).text
            worker.run = real_run
        return ran, sent, scrape

    ran, sent, scrape = asyncio.run(run())
    assert ran == [1]  # only the blocking request's batch ran
    assert sent[0]["status"] == 499
    assert 'coordtok_requests_cancelled_total{route="/v1/encode"} 1.0' in scrape


def test_failures_are_counted_by_reason(client):
    client.post("/v1/encode", content=b"not a video" * 20, headers={"content-type": "video/mp4"})
    client.post("/v1/decode", content=b"{}", headers={"content-type": "application/json"})
    scrape = client.get("/metrics").text
    assert 'coordtok_request_failures_total{reason="UnsupportedMedia",route="/v1/encode"}' in scrape
    assert 'coordtok_request_failures_total{reason="TokenError",route="/v1/decode"}' in scrape


def test_decode_to_webm_by_accept_header(client):
    tokens = client.post("/v1/encode", content=video_file(8), headers={"content-type": "video/mp4"}).content
    response = client.post("/v1/decode", content=tokens, headers={
        "content-type": "application/vnd.coordtok.tokens+safetensors", "accept": "video/webm"})
    assert response.status_code == 200 and response.headers["content-type"] == "video/webm"
    frames, info, _ = read_frames(io.BytesIO(response.content), MediaLimits())
    assert frames.shape == (8, 16, 16, 3) and info.codec == "vp9"


def test_a_request_past_its_deadline_answers_504(weights):
    with TestClient(create_app(settings(weights, request_timeout_s=0.5, batch_wait_ms=2000))) as c:
        response = c.post("/v1/encode", content=video_file(8), headers={"content-type": "video/mp4"})
    assert response.status_code == 504 and "0.5 s" in response.json()["error"]["message"]


def test_an_encode_has_one_deadline_for_its_media_work_and_its_engine_wait(weights, monkeypatch):
    """Reading the upload takes most of the deadline; the engine gets what is left, not a deadline
    of its own (then 0.8 s of media work + 0.6 s of encoding would pass a 1 s deadline)."""
    read = routes_tokens.media.read_frames
    encode = CoordTok.encode

    def slow_read(*args, **kwargs):
        time.sleep(0.8)
        return read(*args, **kwargs)

    def slow_encode(self, *args, **kwargs):
        time.sleep(0.6)
        return encode(self, *args, **kwargs)

    with TestClient(create_app(settings(weights, request_timeout_s=1.0))) as c:
        monkeypatch.setattr(routes_tokens.media, "read_frames", slow_read)
        monkeypatch.setattr(CoordTok, "encode", slow_encode)
        response = c.post("/v1/encode", content=video_file(8), headers={"content-type": "video/mp4"})
    assert response.status_code == 504 and "within 1 s" in response.json()["error"]["message"]
