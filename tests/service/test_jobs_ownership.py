"""One server's lane per jobs dir, and jobs that run only on a server with their models: the three
failures of issue 17. A second server started on a busy port, or on a jobs dir another server
holds, changes no job of the first (it used to requeue its running job before failing to bind); a
job waits for a server with its tokenizer and generator (another server used to finish it with its
own); a fresh server lists an earlier server's jobs with the models they need and why they wait."""
import os
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from coordtok.model import CoordTok, save_model
from coordtok.service.app import create_app
from tests.service.server_process import ROOT, free_port, server_process
from tests.service.test_engine import CONFIG
from tests.service.test_jobs import STATS, save_models, settings, wait


@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    """A tokenizer with other weights than the `models` fixture's, and a generator made for it."""
    folder = tmp_path_factory.mktemp("other-models")
    torch.manual_seed(1)
    save_model(CoordTok(CONFIG), folder / "tokenizer.safetensors", metadata={"latent_stats": STATS.to_json()})
    return save_models(folder)


def serve(models, port: int) -> list[str]:
    tokenizer, generator = models
    return [sys.executable, "-m", "coordtok.service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--model", str(tokenizer), "--generator", str(generator)]


def watch(url: str, job_id: str, seen: list, stop: threading.Event) -> None:
    """Record every (status, attempts) the job shows until `stop`."""
    while not stop.is_set():
        job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        seen.append((job["status"], job["attempts"]))
        time.sleep(0.02)


def test_a_second_server_on_a_busy_port_or_a_held_jobs_dir_changes_no_job_of_the_first(models, tmp_path):
    jobs_dir, port = tmp_path / "jobs", free_port()
    env = {"COORDTOK_JOBS_DIR": str(jobs_dir), "COORDTOK_MAX_GENERATION_STEPS": "100000"}
    with server_process(tmp_path / "first.log", env, serve(models, port), port) as (url, first):
        job = httpx.post(f"{url}/v1/generate", json={"num_videos": 1, "steps": 100000}).json()
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/v1/jobs/{job['id']}").json()["progress"]["step"] == 0:
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.02)
        seen, stop = [], threading.Event()
        watcher = threading.Thread(target=watch, args=(url, job["id"], seen, stop))
        watcher.start()
        environment = {**os.environ, "PYTHONPATH": str(ROOT), "COORDTOK_DEVICES": '["cpu"]', **env}
        try:
            busy_port = subprocess.run(serve(models, port), env=environment, cwd=ROOT, capture_output=True,
                                       text=True, timeout=120)
            other_port = subprocess.run(serve(models, free_port()), env=environment, cwd=ROOT,
                                        capture_output=True, text=True, timeout=120)
        finally:
            stop.set()
            watcher.join()
        assert busy_port.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in busy_port.stderr
        assert other_port.returncode == 2, other_port.stderr
        (refusal,) = [line for line in other_port.stderr.splitlines() if line.startswith("coordtok: error:")]
        assert refusal.startswith(f"coordtok: error: the jobs dir {jobs_dir} is held by the coordtok server with pid "
                                  f"{first.pid} on ") and f"serving 127.0.0.1:{port} since " in refusal, refusal
        assert "COORDTOK_JOBS_DB=postgresql://" in refusal
        assert "warmed up" not in other_port.stderr  # refused before it loaded its models
        assert set(seen) == {("running", 1)}, "the first server's job was touched"  # never requeued, never attempt 2
        assert httpx.get(f"{url}/v1/jobs/{job['id']}").json()["progress"]["step"] > 0
        httpx.delete(f"{url}/v1/jobs/{job['id']}")


@pytest.fixture(scope="module")
def left_by_first_server(models, tmp_path_factory):
    """A jobs dir that a server with the `models` fixture's models left: one job succeeded, and one
    that was running when the server stopped, back in the queue."""
    jobs_dir = tmp_path_factory.mktemp("left")
    with TestClient(create_app(settings(models, jobs_dir, generation_batch_size=1))) as c:
        done = c.post("/v1/generate", json={"num_videos": 1, "steps": 2, "format": "tokens"}).json()
        assert wait(c, done["id"])["status"] == "succeeded"
        waiting = c.post("/v1/generate", json={"num_videos": 2, "steps": 300, "seed": 5, "format": "tokens"}).json()
        wait(c, waiting["id"], until=lambda j: j["status"] == "running")
    return jobs_dir, done["id"], waiting["id"]


def test_a_job_waits_for_a_server_with_its_models_and_runs_on_one(models, other_models, left_by_first_server, tmp_path):
    left, _, waiting_id = left_by_first_server
    shutil.copytree(left, tmp_path / "jobs")
    with TestClient(create_app(settings(other_models, tmp_path / "jobs"))) as c:
        own = c.post("/v1/generate", json={"num_videos": 1, "steps": 2, "format": "tokens"}).json()
        assert wait(c, own["id"])["status"] == "succeeded"  # this server's lane runs its own jobs
        time.sleep(1.5)  # past the lane's 1 s wait for work
        job = c.get(f"/v1/jobs/{waiting_id}").json()
        assert job["status"] == "queued" and job["attempts"] == 1 and job["waiting_for"], job
    with TestClient(create_app(settings(models, tmp_path / "jobs"))) as c:
        done = wait(c, waiting_id)
        assert done["status"] == "succeeded" and done["attempts"] == 2 and done["waiting_for"] is None


def test_a_fresh_server_lists_an_earlier_servers_jobs_with_their_models_and_why_they_wait(
        models, other_models, left_by_first_server, tmp_path):
    left, done_id, waiting_id = left_by_first_server
    shutil.copytree(left, tmp_path / "jobs")
    with TestClient(create_app(settings(other_models, tmp_path / "jobs"))) as c:
        ours = c.get("/v1/models").json()
        listed = {job["id"]: job for job in c.get("/v1/jobs").json()["jobs"]}
    earlier = listed[waiting_id]["models"]
    assert earlier == listed[done_id]["models"] and earlier["tokenizer"]["weights_sha256"] != ours["models"][0]["weights_sha256"]
    assert listed[done_id]["status"] == "succeeded" and listed[done_id]["waiting_for"] is None
    assert listed[waiting_id]["waiting_for"] == (
        f"a server with tokenizer {earlier['tokenizer']['id']} and generator {earlier['generator']['id']} "
        f"(this server runs tokenizer {ours['models'][0]['id']} and generator {ours['generator']['id']})")
