"""A server process killed (SIGKILL) while a job runs and another waits: started again on the
same jobs dir, it finishes both, keeping the videos already written, with the same videos as an
uninterrupted run (`same_video`: the same bytes, or the same decoded frames where x264 repeats
itself imperfectly); no job is lost. Then the `coordtok generate --url` command against that server."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from coordtok.service.cli import main
from coordtok.formats.video import MediaLimits, read_frames
from tests.formats.test_video import same_video
from tests.service.test_jobs import save_models

ROOT = Path(__file__).resolve().parents[2]


def start_server(tmp_path: Path, tokenizer: Path, generator: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COORDTOK_DEVICES": '["cpu"]', "COORDTOK_LOG_FORMAT": "text",
           "COORDTOK_BATCH_WAIT_MS": "0", "COORDTOK_JOBS_DIR": str(tmp_path / "jobs"),
           "COORDTOK_GENERATION_BATCH_SIZE": "2"}
    server = subprocess.Popen([sys.executable, "-m", "coordtok.service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--model", str(tokenizer), "--generator", str(generator)], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    server.kill()
    raise AssertionError("the server did not become ready")


def finished(url: str, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def test_a_killed_server_resumes_its_job_with_identical_results(tmp_path):
    tokenizer, generator = save_models(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    body = {"num_videos": 6, "steps": 100, "seed": 21}
    server = start_server(tmp_path, tokenizer, generator, port)
    try:
        job = httpx.post(f"{url}/v1/generate", json=body).json()
        waiting = httpx.post(f"{url}/v1/generate", json={"num_videos": 1, "steps": 2, "seed": 3}).json()
        while True:  # kill it once the first group of videos is on disk
            seen = httpx.get(f"{url}/v1/jobs/{job['id']}").json()
            assert seen["status"] in ("queued", "running"), "the job finished before the kill: make it slower"
            if seen["progress"]["videos_done"] >= 2:
                break
            time.sleep(0.01)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        results = tmp_path / "jobs" / "results" / job["id"]
        kept = {path.name: path.stat().st_mtime_ns for path in results.glob("*.mp4")}
        assert 2 <= len(kept) < 6

        server = start_server(tmp_path, tokenizer, generator, port)
        resumed = finished(url, job["id"])
        assert resumed["status"] == "succeeded" and resumed["attempts"] == 2
        assert finished(url, waiting["id"])["status"] == "succeeded"  # queued at the kill: not lost
        assert {name: (results / name).stat().st_mtime_ns for name in kept} == kept  # not generated again

        again = finished(url, httpx.post(f"{url}/v1/generate", json=body).json()["id"])  # uninterrupted
        for k in range(6):
            assert same_video(httpx.get(f"{url}/v1/jobs/{job['id']}/results/{k}").content,
                              httpx.get(f"{url}/v1/jobs/{again['id']}/results/{k}").content), f"video {k} differs"

        out = tmp_path / "out"
        assert main(["generate", "-n", "2", "-o", str(out), "--steps", "100", "--seed", "21", "--url", url]) == 0
        for k in range(2):
            frames, _, _ = read_frames(out / f"video_{k:03d}.mp4", MediaLimits())
            assert frames.shape == (8, 16, 16, 3)
            assert same_video((out / f"video_{k:03d}.mp4").read_bytes(), httpx.get(f"{url}/v1/jobs/{job['id']}/results/{k}").content)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
