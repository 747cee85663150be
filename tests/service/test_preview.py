"""/v1/preview: the frames /v1/encode gives the model (the same video and query), at the model's
size, as .npy, mp4 or webm; the playground's original for any format the server reads."""
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient

from coordtok.service.app import create_app
from coordtok.service.commands.roundtrip import SAMPLE_CLIP
from coordtok.formats.video import MediaLimits, read_frames
from tests.service.test_engine import CONFIG
from tests.service.test_jobs import settings

AVI = {"content-type": "video/x-msvideo"}


@pytest.fixture(scope="module")
def client(models, tmp_path_factory):
    app = create_app(settings(models, tmp_path_factory.mktemp("jobs"), generator="none", max_decode_pixels=64 * 16 * 16))
    with TestClient(app) as client:
        yield client


def test_the_preview_is_what_the_model_is_given(client):
    size = (CONFIG.height, CONFIG.width)
    for resize in ("crop", "pad"):
        expected, _, _ = read_frames(SAMPLE_CLIP, MediaLimits(), size=size, resize=resize)
        answer = client.post("/v1/preview", params={"format": "npy", "resize": resize, "first_frame": 5, "frames": 7},
                             content=SAMPLE_CLIP.read_bytes(), headers=AVI)
        assert answer.status_code == 200, answer.text
        assert np.array_equal(np.load(io.BytesIO(answer.content)), expected[5:12])
    default = client.post("/v1/preview", params={"format": "npy"}, files={"file": ("sample.avi", SAMPLE_CLIP.read_bytes())})
    assert np.load(io.BytesIO(default.content)).shape == (CONFIG.frames, *size, 3)  # one clip's frames, multipart too


def test_the_preview_plays_in_a_browser_format(client, tmp_path):
    for fmt, mime in (("mp4", "video/mp4"), ("webm", "video/webm")):
        answer = client.post("/v1/preview", params={"format": fmt, "frames": 4}, content=SAMPLE_CLIP.read_bytes(), headers=AVI)
        assert answer.status_code == 200 and answer.headers["content-type"] == mime
        (tmp_path / f"p.{fmt}").write_bytes(answer.content)
        frames, info, _ = read_frames(tmp_path / f"p.{fmt}", MediaLimits())
        assert frames.shape == (4, CONFIG.height, CONFIG.width, 3) and abs(info.fps - 15) < 0.01


@pytest.mark.parametrize("params, status, says", [
    ({"first_frame": 68}, 422, "the video has 68 frames"),
    ({"start": 2, "end": 1}, 422, "must come after start"),
    ({"frames": 65}, 413, "ask for fewer frames"),
])
def test_a_preview_that_cannot_be_made_says_why(client, params, status, says):
    answer = client.post("/v1/preview", params=params, content=SAMPLE_CLIP.read_bytes(), headers=AVI)
    assert answer.status_code == status and says in answer.json()["error"]["message"]
