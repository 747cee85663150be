"""Generation jobs through the real app, with a tiny tokenizer and a tiny random SiT generator:
lifecycle, results, cancellation, idempotency, limits, pagination, errors, retention, the CLI."""
import dataclasses
import io
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from coordtok.model import CoordTok, LatentStats, SiT, generate_triplanes, save_generator, save_model, sit_preset
from coordtok.model.checkpoint import file_sha256
from coordtok.service.app import create_app
from coordtok.service.cli import main
from coordtok.service.jobs import GenerateRequest, JobModels, JobStore
from coordtok.formats.video import MediaLimits, read_frames
from coordtok.formats.video_write import write_video
from coordtok.service.settings import Settings
from coordtok.formats.tokens import parse
from tests.service.test_engine import CONFIG
from tests.system_tools import require

STATS = LatentStats(tuple(torch.zeros(4) for _ in range(3)), tuple(torch.ones(4) for _ in range(3)))


def save_models(folder, num_classes: int = 0):
    """A tiny tokenizer and a tiny random SiT over its triplanes, as files."""
    torch.manual_seed(0)
    tokenizer = folder / "tokenizer.safetensors"
    if not tokenizer.exists():
        save_model(CoordTok(CONFIG), tokenizer, metadata={"latent_stats": STATS.to_json()})
    config = dataclasses.replace(sit_preset("sit-tiny", CONFIG), dim=32, depth=1, heads=2, num_classes=num_classes)
    generator = folder / f"generator-{num_classes}.safetensors"
    save_generator(SiT(config), generator, STATS, file_sha256(tokenizer))
    return tokenizer, generator


def settings(models, jobs_dir, **overrides) -> Settings:
    tokenizer, generator = models
    return Settings(**{"model": str(tokenizer), "generator": str(generator), "jobs_dir": jobs_dir, "devices": ["cpu"],
                       "batch_wait_ms": 0, "max_generation_steps": 5000, **overrides})


@pytest.fixture(scope="module")
def client(models, tmp_path_factory):
    with TestClient(create_app(settings(models, tmp_path_factory.mktemp("jobs"), generation_batch_size=2))) as c:
        yield c


def wait(client, job_id: str, until=("succeeded", "failed", "cancelled"), timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if until(job) if callable(until) else job["status"] in until:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not reach {until}: {job}")


def test_a_job_runs_to_success_and_its_videos_are_playable(client):
    response = client.post("/v1/generate", json={"num_videos": 3, "steps": 3, "seed": 11})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == job["url"] == f"/v1/jobs/{job['id']}"
    assert job["status"] in ("queued", "running") and job["request"]["seed"] == 11
    done = wait(client, job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"videos_done": 3, "videos": 3, "step": 3, "steps": 3}
    assert done["created_at"] <= done["started_at"] <= done["finished_at"] and done["error"] is None
    assert len(done["results"]) == 3
    video = client.get(done["results"][2])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    frames, _, _ = read_frames(io.BytesIO(video.content), MediaLimits())
    assert frames.shape == (8, 16, 16, 3)
    scrape = client.get("/metrics").text
    for line in ('coordtok_job_transitions_total{status="succeeded"}', 'coordtok_job_duration_seconds_count{status="succeeded"}',
                 "coordtok_sampling_steps_per_second_count", 'coordtok_jobs{status="succeeded"}', "coordtok_videos_generated_total"):
        assert line in scrape, line


def test_token_results_equal_videos_sampled_alone_and_decode_on_the_server(client, models):
    job = client.post("/v1/generate", json={"num_videos": 3, "steps": 2, "seed": 5, "format": "tokens"}).json()
    assert wait(client, job["id"])["status"] == "succeeded"
    tokenizer, generator = models
    from coordtok.model import load_generator

    sit, _ = load_generator(generator, device="cpu")
    for k in range(3):
        body = client.get(f"/v1/jobs/{job['id']}/results/{k}")
        assert body.headers["content-type"] == "application/vnd.coordtok.tokens+safetensors"
        tokens = parse(body.content, "safetensors", CONFIG, max_clips=1)
        assert tokens.metadata["seed"] == "5" and tokens.metadata["index"] == str(k)
        alone = generate_triplanes(sit, STATS, num=1, steps=2, seed=5, first=k)
        torch.testing.assert_close(tokens.triplane.xy, alone.xy, rtol=1e-5, atol=1e-5)
        decoded = client.post("/v1/decode?format=npy", content=body.content, headers={"content-type": body.headers["content-type"]})
        assert decoded.status_code == 200, decoded.text
        assert np.load(io.BytesIO(decoded.content)).shape == (8, 16, 16, 3)


def test_cancelling_queued_and_running_jobs_and_deleting_finished_ones(client):
    running = client.post("/v1/generate", json={"num_videos": 2, "steps": 5000}).json()
    wait(client, running["id"], until=lambda j: j["status"] == "running" and j["progress"]["step"] > 0)
    queued = client.post("/v1/generate", json={"num_videos": 1, "steps": 2}).json()
    assert client.get(f"/v1/jobs/{queued['id']}").json()["status"] == "queued"
    refused = client.get(f"/v1/jobs/{running['id']}/results/0")
    assert refused.status_code == 409 and "once it has succeeded" in refused.json()["error"]["message"]

    cancelled = client.delete(f"/v1/jobs/{queued['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    stopping = client.delete(f"/v1/jobs/{running['id']}")
    assert stopping.status_code == 202 and stopping.json()["cancel_requested"]
    stopped = wait(client, running["id"])
    assert stopped["status"] == "cancelled" and stopped["progress"]["step"] < 5000 and stopped["results"] == []
    assert client.get(f"/v1/jobs/{running['id']}/results/0").status_code == 409

    assert client.delete(f"/v1/jobs/{running['id']}").status_code == 204  # a finished job: deleted
    assert client.get(f"/v1/jobs/{running['id']}").status_code == 404


def test_encode_and_decode_are_served_while_a_long_job_runs(client):
    """The generation lane has its own thread: requests are not queued behind a job's sampling."""
    job = client.post("/v1/generate", json={"num_videos": 2, "steps": 5000}).json()
    wait(client, job["id"], until=lambda j: j["status"] == "running" and j["progress"]["step"] > 0)
    buffer = io.BytesIO()
    write_video(np.full((8, 16, 16, 3), 90, np.uint8), buffer, fps=8)
    for _ in range(3):
        tokens = client.post("/v1/encode", content=buffer.getvalue(), headers={"content-type": "video/mp4"})
        assert tokens.status_code == 200, tokens.text
        decoded = client.post("/v1/decode?format=npy", content=tokens.content,
                              headers={"content-type": tokens.headers["content-type"]})
        assert decoded.status_code == 200, decoded.text
    during = client.get(f"/v1/jobs/{job['id']}").json()
    assert during["status"] == "running" and during["progress"]["step"] < 5000
    client.delete(f"/v1/jobs/{job['id']}")
    assert wait(client, job["id"])["status"] == "cancelled"


def test_the_lanes_decodes_take_a_place_in_the_engine_queue_and_wait_for_one(models, tmp_path):
    """A generated video is decoded as a /v1/decode request is: it needs one of the engine's
    max_queue places. While a request holds the only one, the job waits after sampling (it does
    not fail and does not pass the request); once the place is free it finishes."""
    app = create_app(settings(models, tmp_path, max_queue=1))
    with TestClient(app) as c:
        with app.state.runtime.engine.admit():  # the only place, held as a request in progress holds it
            job = c.post("/v1/generate", json={"num_videos": 1, "steps": 2}).json()
            wait(c, job["id"], until=lambda j: j["progress"]["step"] == 2)  # sampled; now it decodes
            time.sleep(0.5)
            waiting = c.get(f"/v1/jobs/{job['id']}").json()
            assert waiting["status"] == "running" and waiting["progress"]["videos_done"] == 0, waiting
            assert app.state.runtime.engine.in_system == 1
        done = wait(c, job["id"])
        assert done["status"] == "succeeded" and done["progress"]["videos_done"] == 1


def test_same_idempotency_key_and_body_give_the_same_job_another_body_422(client):
    key = {"idempotency-key": "order-42"}
    first = client.post("/v1/generate", json={"num_videos": 1, "steps": 2}, headers=key)
    again = client.post("/v1/generate", json={"num_videos": 1, "steps": 2}, headers=key)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert again.json()["request"]["seed"] == first.json()["request"]["seed"]  # the seed the server picked
    other = client.post("/v1/generate", json={"num_videos": 2, "steps": 2}, headers=key)
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["error"]["message"]
    fresh = client.post("/v1/generate", json={"num_videos": 1, "steps": 2})
    assert fresh.json()["id"] != first.json()["id"]
    wait(client, fresh.json()["id"])


@pytest.mark.parametrize("body,message", [
    ({"num_videos": 17}, "the limit is 16 per job"),
    ({"steps": 5001}, "the limit is 5000"),
    ({"sampler": "ddim"}, "sampler"),
    ({"guidance": 0.5}, "guidance"),
    ({"num_videos": 0}, "num_videos"),
    ({"class_label": 1}, "unconditional"),
    ({"colour": "red"}, "colour"),
])
def test_bad_requests_are_422_with_the_reason(client, body, message):
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]["message"]


def test_unknown_jobs_and_results_out_of_range_are_404(client):
    assert client.get("/v1/jobs/nope").status_code == 404
    assert client.delete("/v1/jobs/nope").status_code == 404
    missing = client.get("/v1/jobs/nope/results/0")
    assert missing.status_code == 404 and "no job" in missing.json()["error"]["message"]
    job = client.post("/v1/generate", json={"num_videos": 1, "steps": 1}).json()
    wait(client, job["id"])
    out_of_range = client.get(f"/v1/jobs/{job['id']}/results/1")
    assert out_of_range.status_code == 404 and "results 0 to 0" in out_of_range.json()["error"]["message"]


def test_listing_is_newest_first_paginated_and_filtered(models, tmp_path):
    with TestClient(create_app(settings(models, tmp_path))) as c:
        ids = [c.post("/v1/generate", json={"num_videos": 1, "steps": 1, "format": "tokens"}).json()["id"] for _ in range(5)]
        for job_id in ids:
            wait(c, job_id)
        seen, cursor = [], None
        while True:
            page = c.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
            assert len(page["jobs"]) <= 2
            seen += [job["id"] for job in page["jobs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == ids[::-1]
        c.delete(f"/v1/jobs/{ids[0]}")
        assert [j["id"] for j in c.get("/v1/jobs?status=succeeded").json()["jobs"]] == ids[:0:-1]
        assert c.get("/v1/jobs?status=queued").json() == {"jobs": [], "next_cursor": None}
        assert c.get("/v1/jobs?status=done").status_code == 422


def test_a_full_job_queue_answers_503(models, tmp_path):
    with TestClient(create_app(settings(models, tmp_path, max_queued_jobs=1))) as c:
        first = c.post("/v1/generate", json={"num_videos": 1, "steps": 5000}).json()
        refused = c.post("/v1/generate", json={"num_videos": 1, "steps": 1})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "the limit is 1" in refused.json()["error"]["message"]
        c.delete(f"/v1/jobs/{first['id']}")
        wait(c, first["id"])
        assert c.post("/v1/generate", json={"num_videos": 1, "steps": 1}).status_code == 202


def test_without_a_generator_generate_is_503_and_encode_still_works(models, tmp_path):
    tokenizer, _ = models
    with TestClient(create_app(settings(models, tmp_path, generator=str(tmp_path / "missing.safetensors")))) as c:
        response = c.post("/v1/generate", json={"num_videos": 1})
        assert response.status_code == 503 and "no generator is loaded" in response.json()["error"]["message"]
        assert "missing.safetensors" in response.json()["error"]["message"]
        assert c.get("/readyz").status_code == 200 and c.get("/v1/models").json()["generator"] is None
        assert c.get("/v1/jobs").json() == {"jobs": [], "next_cursor": None}
        buffer = io.BytesIO()
        write_video(np.full((8, 16, 16, 3), 90, np.uint8), buffer, fps=8)
        assert c.post("/v1/encode", content=buffer.getvalue(), headers={"content-type": "video/mp4"}).status_code == 200
    assert not (tmp_path / "jobs.sqlite3").exists()  # a server that cannot generate writes no job store


def test_class_labels_and_guidance_with_a_class_conditional_generator(models, tmp_path):
    tokenizer, _ = models
    _, conditional = save_models(tokenizer.parent, num_classes=3)
    with TestClient(create_app(settings((tokenizer, conditional), tmp_path))) as c:
        assert c.get("/v1/models").json()["generator"]["classes"] == 3
        out_of_range = c.post("/v1/generate", json={"class_label": 3})
        assert out_of_range.status_code == 422 and "[0, 2]" in out_of_range.json()["error"]["message"]
        assert c.post("/v1/generate", json={"guidance": 2.0}).status_code == 422  # guidance needs a label
        job = c.post("/v1/generate", json={"class_label": 2, "guidance": 2.0, "steps": 2, "format": "webm"}).json()
        done = wait(c, job["id"])
        assert done["status"] == "succeeded" and done["request"]["class_label"] == 2
        assert c.get(done["results"][0]).headers["content-type"] == "video/webm"


def test_stopping_the_server_requeues_the_running_job_and_a_restart_finishes_it(models, tmp_path):
    with TestClient(create_app(settings(models, tmp_path, generation_batch_size=1))) as c:
        job = c.post("/v1/generate", json={"num_videos": 3, "steps": 200, "seed": 3, "format": "tokens"}).json()
        wait(c, job["id"], until=lambda j: j["progress"]["videos_done"] >= 1)
    stored = JobStore(tmp_path).get(job["id"])
    assert stored.status == "queued" and stored.videos_done >= 1 and stored.attempts == 1
    kept = (tmp_path / "results" / job["id"] / "0000.safetensors").stat().st_mtime_ns
    with TestClient(create_app(settings(models, tmp_path, generation_batch_size=1))) as c:
        done = wait(c, job["id"])
        assert done["status"] == "succeeded" and done["attempts"] == 2
        assert (tmp_path / "results" / job["id"] / "0000.safetensors").stat().st_mtime_ns == kept


def test_the_sweep_removes_finished_jobs_past_the_retention(tmp_path):
    store = JobStore(tmp_path)
    models = JobModels("tokenizer@1", "1" * 64, "generator@2", "2" * 64)
    old, _ = store.create(GenerateRequest(num_videos=1, format="tokens"), batch_size=1, max_active=10, models=models)
    assert store.claim("lane", models, lease_s=30).id == old.id
    store.write_result(old, 0, b"result")
    store.finish(old.id, "lane", "succeeded")
    recent, _ = store.create(GenerateRequest(num_videos=1), batch_size=1, max_active=10, models=models)
    assert store.sweep(older_than_s=3600) == 0
    time.sleep(0.01)
    assert store.sweep(older_than_s=0.001) == 1
    assert store.get(old.id) is None and not (tmp_path / "results" / old.id).exists()
    assert store.get(recent.id).status == "queued"  # unfinished jobs are never swept


def test_generate_command_in_process_writes_playable_videos(models, tmp_path, capsys):
    tokenizer, generator = models
    code = main(["generate", "-n", "2", "-o", str(tmp_path / "out"), "--steps", "2", "--seed", "4",
                 "--model", str(tokenizer), "--generator", str(generator), "--device", "cpu"])
    assert code == 0
    assert "seed 4" in capsys.readouterr().out
    for k in range(2):
        frames, info, _ = read_frames(tmp_path / "out" / f"video_{k:03d}.mp4", MediaLimits())
        assert frames.shape == (8, 16, 16, 3) and abs(info.fps - 25) < 0.01
    assert main(["generate", "-o", str(tmp_path / "x"), "--model", str(tokenizer),
                 "--generator", str(tmp_path / "missing.safetensors")]) == 2
    assert "no generator" in capsys.readouterr().err


def test_job_routes_are_counted_under_their_templates_and_pass_promtool(client):
    import shutil
    import subprocess

    client.get("/v1/jobs/some-job-id")
    scrape = client.get("/metrics").text
    assert 'coordtok_requests_total{route="/v1/jobs/{job_id}",status="404"}' in scrape
    assert "some-job-id" not in scrape
    require(shutil.which("promtool"), "promtool", "apt-get install prometheus; .ci/run installs it")
    result = subprocess.run(["promtool", "check", "metrics"], input=scrape, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
