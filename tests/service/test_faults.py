"""Faults: a device running out of memory inside a batch, a damaged or wrong model file at
start-up, a full disk under the results, and more requests than the server holds. Each fails
what it must (those requests with 503, the start with a clear message and a non-zero exit, that
job) and the server keeps serving."""
import asyncio
import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from coordtok.service.jobs import store as job_store
from coordtok.service.app import create_app
from coordtok.service.settings import Settings
from tests.service.test_app import video_file
from tests.service.test_jobs import wait

ROOT = Path(__file__).resolve().parents[2]
VIDEO = {"content-type": "video/mp4"}


def settings(models, folder, **overrides) -> Settings:
    tokenizer, generator = models
    return Settings(**{"model": str(tokenizer), "generator": str(generator), "jobs_dir": folder / "jobs",
                       "devices": ["cpu"], "batch_wait_ms": 0, **overrides})


def fail_once(function, error: Exception):
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise error
        return function(*args, **kwargs)

    return failing


def test_out_of_memory_in_a_batch_fails_it_with_503_and_the_next_requests_succeed(models, tmp_path):
    app = create_app(settings(models, tmp_path, generator="none"))
    with TestClient(app) as client:
        model = app.state.runtime.engine.workers[0].model
        model.encode = fail_once(model.encode, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        failed = client.post("/v1/encode", content=video_file(8), headers=VIDEO)
        assert failed.status_code == 503 and failed.headers["retry-after"] == "1"
        assert failed.json()["error"] == {"type": "DeviceFailure", "message":
                                          "cpu ran out of memory on a batch holding this request; retry, or send fewer clips"}
        assert client.get("/readyz").status_code == 200  # the probe after the failure found the device usable
        tokens = client.post("/v1/encode", content=video_file(8), headers=VIDEO)
        assert tokens.status_code == 200

        kind = {"content-type": tokens.headers["content-type"]}
        model.decode_video = fail_once(model.decode_video, torch.OutOfMemoryError("out of memory"))
        assert client.post("/v1/decode?format=npy", content=tokens.content, headers=kind).status_code == 503
        assert client.post("/v1/decode?format=npy", content=tokens.content, headers=kind).status_code == 200
        scrape = client.get("/metrics").text
    assert 'coordtok_out_of_memory_total{device="cpu"} 2.0' in scrape
    assert 'coordtok_request_failures_total{reason="DeviceFailure",route="/v1/encode"} 1.0' in scrape


def serve(model: Path, port: int, env: dict | None = None) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "COORDTOK_DEVICES": '["cpu"]', "COORDTOK_LOG_FORMAT": "text",
                   **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "coordtok.service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--model", str(model), "--generator", "none"], env=environment, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_damaged_or_wrong_model_file_stops_the_start_with_a_clear_error(models, tmp_path):
    tokenizer, _ = models
    whole = tokenizer.read_bytes()
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(4096))
    (tmp_path / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    cases = {  # file -> what the message says
        "garbage.safetensors": "SafetensorError", "truncated.safetensors": "SafetensorError",
        "other.safetensors": "not a CoordTok safetensors file",
    }
    servers = {name: serve(tmp_path / name, 0) for name in cases}  # port 0: never reached
    for name, expected in cases.items():
        out, err = servers[name].communicate(timeout=120)
        assert servers[name].returncode == 2, (name, err[-2000:])
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"coordtok: error: cannot load the model {tmp_path / name}") and expected in last, (name, last)


def test_a_damaged_generator_turns_generation_off_and_says_why(models, tmp_path):
    (tmp_path / "generator.safetensors").write_bytes(os.urandom(2048))
    with TestClient(create_app(settings(models, tmp_path, generator=str(tmp_path / "generator.safetensors")))) as client:
        refused = client.post("/v1/generate", json={"steps": 2})
        assert refused.status_code == 503 and "cannot be read" in refused.json()["error"]["message"]
        assert client.post("/v1/encode", content=video_file(8), headers=VIDEO).status_code == 200


def test_a_full_disk_fails_the_job_not_the_server(models, tmp_path, monkeypatch):
    """The results' writes fail as a full disk makes them fail (ENOSPC at fsync, where delayed
    allocation reports it): the job ends `failed` saying so, nothing half-written stays, and the
    next job and requests succeed once there is room again."""
    with TestClient(create_app(settings(models, tmp_path, generation_batch_size=2))) as client:
        def no_space(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(job_store.os, "fsync", no_space)
        job = client.post("/v1/generate", json={"num_videos": 2, "steps": 2, "seed": 1}).json()
        failed = wait(client, job["id"])
        monkeypatch.undo()
        assert failed["status"] == "failed" and "No space left on device" in failed["error"], failed
        assert not (tmp_path / "jobs" / "results" / job["id"]).exists()
        assert client.get(f"/v1/jobs/{job['id']}/results/0").status_code == 409
        assert client.get("/readyz").status_code == 200
        again = client.post("/v1/generate", json={"num_videos": 2, "steps": 2, "seed": 1}).json()
        assert wait(client, again["id"])["status"] == "succeeded"
        assert client.get(f"/v1/jobs/{again['id']}/results/1").status_code == 200
        assert client.post("/v1/encode", content=video_file(8), headers=VIDEO).status_code == 200
        scrape = client.get("/metrics").text
    assert 'coordtok_job_transitions_total{status="failed"} 1.0' in scrape


def test_more_requests_than_the_queue_holds_get_503_never_another_5xx(models, tmp_path):
    """48 clients at once against room for 4: every answer is 200 or the documented 503 with
    Retry-After; once the burst is over a request succeeds."""
    app = create_app(settings(models, tmp_path, generator="none", max_queue=4, batch_wait_ms=20))
    body = video_file(8)

    async def run():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as c:
                burst = await asyncio.gather(*(c.post("/v1/encode", content=body, headers=VIDEO) for _ in range(48)))
                after = await c.post("/v1/encode", content=body, headers=VIDEO)
        return burst, after

    started = time.perf_counter()
    burst, after = asyncio.run(run())
    statuses = [r.status_code for r in burst]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 4 and statuses.count(503) >= 1, statuses
    for refused in (r for r in burst if r.status_code == 503):
        assert refused.headers["retry-after"] == "1" and "limit is 4" in refused.json()["error"]["message"]
    assert after.status_code == 200
    assert time.perf_counter() - started < 60
