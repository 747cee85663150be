"""Who gets in and what a request can make the server hold: API keys on every route (enumerated
from the app, so new routes are covered), constant-time key comparison, CORS only when
configured, body limits applied while the body streams (chunked and multipart included),
temporary uploads always removed, unguessable job ids, result paths that stay in their folder."""
import asyncio
import errno
import hmac
import re
import uuid

import httpx
from fastapi.testclient import TestClient
from starlette.routing import Mount

from coordtok.service import middleware
from coordtok.service import uploads as uploads_module
from coordtok.service.app import create_app
from coordtok.service.jobs import GenerateRequest, JobModels, JobStore
from tests.service.test_app import video_file
from tests.service.test_faults import settings
from tests.service.test_jobs import wait

KEY = "k3y-0123456789"
# Open without a key: liveness, readiness, metrics, and the playground page with its files.
OPEN_PATHS = {"/healthz", "/readyz", "/metrics", "/", "/favicon.ico"}
OPEN_PREFIXES = ("/static/",)
TOKEN_TYPE = {"content-type": "application/vnd.coordtok.tokens+safetensors"}


def concrete_requests(app) -> list[tuple[str, str]]:
    """(method, path) for every route of the app, path parameters filled in."""
    found = []
    for route in app.routes:
        if isinstance(route, Mount):
            found.append(("GET", route.path + "/x.js"))
            continue
        path = re.sub(r"\{k(:[a-z]+)?\}", "0", route.path)
        path = re.sub(r"\{[a-z_]+(:[a-z]+)?\}", uuid.uuid4().hex, path)
        found.extend((method, path) for method in sorted(route.methods - {"HEAD"}))
    return found


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def test_every_route_but_the_open_ones_refuses_a_missing_or_wrong_key(models, tmp_path):
    app = create_app(settings(models, tmp_path, api_keys=[KEY]))
    requests = concrete_requests(app)
    assert {"/v1/encode", "/v1/decode", "/v1/generate", "/v1/models", "/openapi.json"} <= {p for _, p in requests}
    wrong = KEY[:-1] + "x"  # same length, last byte differs
    with TestClient(app) as client:
        for method, path in requests:
            answers = {
                "none": client.request(method, path),
                "wrong": client.request(method, path, headers={"authorization": f"Bearer {wrong}"}),
                "other scheme": client.request(method, path, headers={"authorization": f"Basic {KEY}"}),
                "right": client.request(method, path, headers={"authorization": f"Bearer {KEY}"}),
            }
            if is_open(path):
                assert answers["none"].status_code != 401, (method, path)
                continue
            for case in ("none", "wrong", "other scheme"):
                assert answers[case].status_code == 401, (method, path, case, answers[case].status_code)
                assert answers[case].headers["www-authenticate"] == "Bearer"
            assert answers["right"].status_code != 401, (method, path)
        # An unknown path is refused too (no way to probe which routes exist), and so is a path
        # that climbs out of the open static folder.
        assert client.get("/v2/anything").status_code == 401
        assert client.get("/static/../v1/models").status_code in (401, 404)


def test_keys_are_compared_in_constant_time_with_every_key(models, tmp_path, monkeypatch):
    compared = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)
    app = create_app(settings(models, tmp_path, api_keys=[KEY, "second-key"], generator="none"))
    with TestClient(app) as client:
        assert client.get("/v1/models", headers={"authorization": f"Bearer {KEY}"}).status_code == 200
        assert len(compared) == 2  # the first key matched; the second was compared all the same
        compared.clear()
        assert client.get("/v1/models", headers={"authorization": "Bearer nope"}).status_code == 401
        assert [b for _, b in compared] == [KEY.encode(), b"second-key"]


def test_cors_headers_only_when_origins_are_configured(models, tmp_path):
    origin = "https://app.example"
    preflight = {"origin": origin, "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization,content-type"}
    with TestClient(create_app(settings(models, tmp_path, generator="none"))) as client:
        plain = client.get("/v1/models", headers={"origin": origin})
        assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
        assert "access-control-allow-origin" not in client.options("/v1/encode", headers=preflight).headers

    app = create_app(settings(models, tmp_path, generator="none", api_keys=[KEY], cors_origins=[origin]))
    with TestClient(app) as client:
        allowed = client.options("/v1/encode", headers=preflight)  # a preflight carries no key
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == origin
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        other = client.options("/v1/encode", headers={**preflight, "origin": "https://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        answer = client.get("/v1/models", headers={"origin": origin, "authorization": f"Bearer {KEY}"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == origin
        assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()
        refused = client.get("/v1/models", headers={"origin": origin})  # the browser can read the 401
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == origin


async def _post_chunked(app, path: str, chunk: bytes, chunks: int, content_type: str) -> tuple[httpx.Response, int]:
    """POST a body of `chunks` chunks without Content-Length; returns the answer and how many
    chunks the server pulled."""
    pulled = 0

    async def body():
        nonlocal pulled
        for _ in range(chunks):
            pulled += 1
            yield chunk

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        response = await client.post(path, content=body(), headers={"content-type": content_type})
    return response, pulled


def test_bodies_are_bounded_while_they_stream_in(models, tmp_path):
    """Chunked bodies without Content-Length, raw, multipart and JSON: refused with 413 once past
    the limit, after reading little more than the limit."""
    app = create_app(settings(models, tmp_path, max_upload_bytes=10_000, upload_dir=tmp_path))
    boundary = "xyz"
    multipart_start = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp4\"\r\n"
                       "Content-Type: video/mp4\r\n\r\n").encode()

    async def run():
        async with app.router.lifespan_context(app):
            results = {
                "raw encode": await _post_chunked(app, "/v1/encode", b"\0" * 1000, 1000, "video/mp4"),
                "multipart encode": await _post_chunked(app, "/v1/encode", multipart_start + b"\0" * 1000, 1000,
                                                        f"multipart/form-data; boundary={boundary}"),
                "decode": await _post_chunked(app, "/v1/decode", b"\0" * 1000, 1000, TOKEN_TYPE["content-type"]),
                "generate": await _post_chunked(app, "/v1/generate", b" " * 1000, 1000, "application/json"),
            }
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                declared = await client.post("/v1/encode", content=b"\0" * 20_000, headers={"content-type": "video/mp4"})
                after = await client.post("/v1/encode", content=video_file(8), headers={"content-type": "video/mp4"})
                scrape = (await client.get("/metrics")).text
        return results, declared, after, scrape

    results, declared, after, scrape = asyncio.run(run())
    limits = {"raw encode": 10_000, "multipart encode": 10_000, "decode": 10_000, "generate": 64 * 1024}
    for name, (response, pulled) in results.items():
        assert response.status_code == 413, (name, response.status_code, response.text)
        assert response.json()["error"]["type"] == "BodyTooLarge", name
        assert pulled * 1000 <= limits[name] + 2000, (name, pulled)  # stopped just past the limit
    assert declared.status_code == 413 and "20000 bytes" in declared.json()["error"]["message"]
    assert after.status_code == 200
    assert list(tmp_path.glob("coordtok-*.upload")) == []
    assert 'coordtok_requests_total{route="/v1/encode",status="413"} 3.0' in scrape


def test_token_bodies_are_bounded_by_what_max_clips_can_need(models, tmp_path):
    from coordtok.formats.tokens import largest_file_bytes
    from tests.service.test_engine import CONFIG

    with TestClient(create_app(settings(models, tmp_path, generator="none", max_clips=2))) as client:
        limit = largest_file_bytes(CONFIG, 2)
        assert limit < 512 * 1024 * 1024
        response = client.post("/v1/decode", content=b"{" + b" " * limit + b"}", headers={"content-type": "application/json"})
        assert response.status_code == 413 and str(limit) in response.json()["error"]["message"]


class _FullDisk:
    """A temporary file whose writes fail as on a full disk (the real file is still created)."""

    def __init__(self, real):
        self._real = real
        self.name = real.name

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._real.close()


def test_temporary_uploads_are_always_removed(models, tmp_path, monkeypatch):
    """Count the files in `upload_dir` after success, every kind of refusal, a full disk and
    clients that go away during the upload or while their work waits."""
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    app = create_app(settings(models, tmp_path, generator="none", upload_dir=uploads, max_upload_bytes=50_000))
    good = video_file(8)
    left = lambda: sorted(p.name for p in uploads.iterdir())  # noqa: E731

    with TestClient(app) as client:
        for body, kind, status in [(good, "video/mp4", 200), (b"not a video" * 50, "video/mp4", 415), (b"", "video/mp4", 422),
                                   (good[: len(good) // 2], "video/mp4", 422), (b"\0" * 60_000, "video/mp4", 413)]:
            assert client.post("/v1/encode", content=body, headers={"content-type": kind}).status_code == status
            assert left() == [], status
        assert client.post("/v1/encode", files={"file": ("a.mp4", good, "video/mp4")}).status_code == 200
        assert client.post("/v1/encode", files={"other": ("a.mp4", good, "video/mp4")}).status_code == 422
        assert client.post("/v1/encode", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"}).status_code in (400, 422)
        assert left() == []
        assert client.post("/v1/encode?start=5&end=1", content=good, headers={"content-type": "video/mp4"}).status_code == 422

        real_temporary = uploads_module.tempfile.NamedTemporaryFile
        monkeypatch.setattr(uploads_module.tempfile, "NamedTemporaryFile", lambda **kw: _FullDisk(real_temporary(**kw)))
        full = client.post("/v1/encode", content=good, headers={"content-type": "video/mp4"})
        assert full.status_code == 503 and "no room" in full.json()["error"]["message"] and full.headers["retry-after"]
        monkeypatch.undo()
        assert left() == []

    async def gone_during_upload():
        messages = [{"type": "http.request", "body": good[:1000], "more_body": True}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/encode", "raw_path": b"/v1/encode", "query_string": b"",
                 "headers": [(b"content-type", b"video/mp4")], "http_version": "1.1", "scheme": "http",
                 "server": ("test", 80), "client": ("test", 1), "root_path": ""}
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)
        return sent

    sent = asyncio.run(gone_during_upload())
    assert sent[0]["status"] == 499
    assert left() == []


def test_job_ids_are_random_uuid4(tmp_path):
    store = JobStore(tmp_path)
    models = JobModels("tokenizer@1", "1" * 64, "generator@2", "2" * 64)
    ids = [store.create(GenerateRequest(), 1, 100, models)[0].id for _ in range(20)]
    store.close()
    assert len(set(ids)) == 20
    for job_id in ids:
        assert re.fullmatch(r"[0-9a-f]{32}", job_id) and uuid.UUID(job_id).version == 4


def test_result_paths_cannot_leave_the_results_folder(models, tmp_path):
    app = create_app(settings(models, tmp_path))
    with TestClient(app) as client:
        job = client.post("/v1/generate", json={"num_videos": 1, "steps": 1, "format": "tokens"}).json()
        assert wait(client, job["id"])["status"] == "succeeded"
        database = (tmp_path / "jobs" / "jobs.sqlite3").read_bytes()[:16]
        attempts = [
            f"/v1/jobs/{job['id']}/results/..%2F..%2Fjobs.sqlite3", f"/v1/jobs/{job['id']}/results/-1",
            f"/v1/jobs/{job['id']}/results/1", f"/v1/jobs/{job['id']}/results/0x0", f"/v1/jobs/{job['id']}/results/1e9",
            "/v1/jobs/..%2F..%2Fjobs.sqlite3/results/0", "/v1/jobs/..%2F/results/0", "/v1/jobs/%2e%2e/results/0",
            f"/v1/jobs/{job['id']}%2F..%2F..%2Fjobs.sqlite3", "/v1/jobs/..", "/v1/jobs/%00/results/0",
        ]
        for path in attempts:
            response = client.get(path)
            assert response.status_code in (404, 405, 422), (path, response.status_code)
            assert database not in response.content, path
            assert client.delete(path).status_code in (404, 405, 422), path
        assert (tmp_path / "jobs" / "jobs.sqlite3").is_file()
        assert client.get(f"/v1/jobs/{job['id']}/results/0").status_code == 200

    async def raw(path: str) -> list:  # an unnormalised path, as a raw HTTP request line could carry it
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": [], "http_version": "1.1", "scheme": "http", "server": ("test", 80),
                 "client": ("test", 1), "root_path": ""}
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)
        return sent

    for path in ("/v1/jobs/../../jobs.sqlite3/results/0", f"/v1/jobs/{job['id']}/results/../../../jobs.sqlite3",
                 "/static/../../model/weights/default.safetensors", "/static/../app.py"):
        sent = asyncio.run(raw(path))
        assert sent[0]["status"] in (404, 422), (path, sent[0]["status"])
        assert database not in b"".join(m.get("body", b"") for m in sent[1:])
