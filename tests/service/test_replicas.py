"""A server over two model replicas (two CPU replicas standing in for two GPUs): a replica with a
non-recoverable device error is taken out of service while the other serves; with none left,
/healthz fails so that an orchestrator restarts the process."""
from fastapi.testclient import TestClient

from coordtok.service.app import create_app
from coordtok.service.settings import Settings
from tests.service.test_app import video_file

VIDEO = {"content-type": "video/mp4"}


def lost_device(batch):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_replicas_lost_one_by_one_end_in_a_failing_health_check(models, tmp_path):
    tokenizer, _ = models
    settings = Settings(model=str(tokenizer), generator="none", jobs_dir=tmp_path / "jobs",
                        devices=["cpu:0", "cpu:1"], batch_wait_ms=0)
    app = create_app(settings)
    body = video_file(8)
    with TestClient(app) as client:
        first, second = app.state.runtime.engine.workers
        assert client.post("/v1/encode", content=body, headers=VIDEO).status_code == 200
        first.run = lost_device
        failed = client.post("/v1/encode", content=body, headers=VIDEO)
        assert failed.status_code == 503 and "taken out of service" in failed.json()["error"]["message"]
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        assert client.post("/v1/encode", content=body, headers=VIDEO).status_code == 200  # on cpu:1

        second.run = lost_device
        assert client.post("/v1/encode", content=body, headers=VIDEO).status_code == 503
        health = client.get("/healthz")
        assert health.status_code == 503
        assert health.json() == {"status": "no device in service",
                                 "devices": {"cpu:0": "out of service", "cpu:1": "out of service"}}
        assert client.get("/readyz").status_code == 503
        refused = client.post("/v1/encode", content=body, headers=VIDEO)
        assert refused.status_code == 503 and "no device is in service" in refused.json()["error"]["message"]
