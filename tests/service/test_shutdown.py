"""SIGTERM: readiness and new work answer 503 at once, the request in flight completes, then exit."""
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from coordtok.model import CoordTok, save_model
from coordtok.formats.video_write import write_video
from tests.service.test_engine import CONFIG

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_drains_requests_in_flight(tmp_path):
    torch.manual_seed(0)
    save_model(CoordTok(CONFIG), tmp_path / "small.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COORDTOK_DEVICES": '["cpu"]',
           "COORDTOK_BATCH_WAIT_MS": "2000", "COORDTOK_LOG_FORMAT": "text"}  # a request waits 2 s for company
    server = subprocess.Popen([sys.executable, "-m", "coordtok.service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--model", str(tmp_path / "small.safetensors")], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        buffer = io.BytesIO()
        write_video(np.full((8, 16, 16, 3), 100, np.uint8), buffer, fps=8)
        result = {}
        in_flight = threading.Thread(target=lambda: result.update(r=httpx.post(
            f"{url}/v1/encode", content=buffer.getvalue(), headers={"content-type": "video/mp4"}, timeout=60)))
        in_flight.start()
        time.sleep(0.5)  # the request is waiting in the batcher
        server.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(f"{url}/readyz").status_code == 503
        refused = httpx.post(f"{url}/v1/encode", content=buffer.getvalue(), headers={"content-type": "video/mp4"})
        assert refused.status_code == 503 and "not accepting" in refused.json()["error"]["message"]
        in_flight.join(timeout=60)
        assert result["r"].status_code == 200
        # uvicorn re-raises the captured signal once shut down: the exit is by SIGTERM, cleanly
        assert server.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if server.poll() is None:
            server.kill()
        output = server.stdout.read()
    assert "Traceback" not in output, output
