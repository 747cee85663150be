"""The clip policy through the server (model/clips.py): videos longer than a clip get an
overlapping last clip, shorter ones are stretched, decode returns every frame exactly once, and
token files of older servers (consecutive, -1 padded clips) still decode, placed by the running
sum of their frame counts."""
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors

from coordtok.model import CoordTok
from coordtok.model.clips import ClipLayout
from coordtok.model.triplane import Triplane, from_uint8, to_uint8
from coordtok.service.app import create_app
from coordtok.formats.video import read_frames
from coordtok.formats.tokens import Tokens, serialise
from tests.service.test_app import settings, video_file, weights  # noqa: F401  (weights is a fixture)
from tests.service.test_engine import CONFIG  # 8 frames at 16x16


@pytest.fixture(scope="module")
def client(weights):  # noqa: F811
    with TestClient(create_app(settings(weights))) as c:
        yield c


def encode(client, frames: int):
    response = client.post("/v1/encode", content=video_file(frames), headers={"content-type": "video/mp4"})
    assert response.status_code == 200, response.text
    header = json.loads(response.content[8 : 8 + int.from_bytes(response.content[:8], "little")])["__metadata__"]
    return response.content, header


def decode(client, body: bytes, query: str = "") -> np.ndarray:
    response = client.post(f"/v1/decode?format=npy{query}", content=body,
                           headers={"content-type": "application/vnd.coordtok.tokens+safetensors"})
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content))


@pytest.mark.parametrize("frames", [3, 8, 13, 20])
def test_decode_gives_back_every_frame_and_ranges_equal_the_full_decode(client, frames):
    body, meta = encode(client, frames)
    layout = ClipLayout.plan(frames, CONFIG.frames, "stretch")
    assert json.loads(meta["clip_starts"]) == list(layout.starts) and json.loads(meta["n_frames"]) == list(layout.lengths)
    video = decode(client, body)
    assert video.shape == (frames, CONFIG.height, CONFIG.width, 3)
    for start, end in [(0, 1), (frames - 2, frames), (1, frames)]:
        if 0 <= start < end:
            np.testing.assert_array_equal(decode(client, body, f"&start={start}&end={end}"), video[start:end])


def test_the_server_reconstructs_what_the_model_does_with_the_same_clips(client, weights):  # noqa: F811
    """Encode + decode through the server equals the model run on the layout's clips, stitched."""
    from coordtok.model import load_model

    model = load_model(str(weights), device="cpu")
    source, _, _ = read_frames(io.BytesIO(video_file(13)), size=(CONFIG.height, CONFIG.width))
    layout = ClipLayout.plan(len(source), CONFIG.frames, "stretch")
    with torch.inference_mode():
        triplane = model.encode(from_uint8(layout.cut(torch.from_numpy(source))), layout.model_n_frames())
        expected = layout.stitch(to_uint8(model.decode_video(triplane)))
    body, _ = encode(client, 13)
    np.testing.assert_allclose(decode(client, body).astype(int), expected.numpy().astype(int), atol=1)


def test_old_token_files_are_placed_by_the_running_sum_of_their_frames(client):
    """A partial clip anywhere but last (n_frames [4, 8], no clip_starts): 12 frames, not 8 + gap."""
    planes = load_safetensors(encode(client, 16)[0])
    tokens = Tokens(Triplane(planes["xy"], planes["yt"], planes["xt"]), {"frames_per_clip": "8", "n_frames": "[4, 8]"})
    video = decode(client, serialise(tokens, "safetensors"))
    assert video.shape[0] == 12


@pytest.mark.parametrize("meta, message", [
    ({"n_frames": "[8, 8]", "clip_starts": "[0, 9]"}, "no gap"),
    ({"n_frames": "[8, 8]", "clip_starts": "[0]"}, "one per clip"),
    ({"n_frames": "[8, 4]", "clip_starts": "[0, 8]", "clip_policy": "stretch"}, "single-clip"),
    ({"n_frames": "[8, 8]", "clip_starts": "[0, 8]", "clip_policy": "mirror"}, "clip policy"),
])
def test_impossible_clip_metadata_is_a_422_that_names_the_problem(client, meta, message):
    planes = load_safetensors(encode(client, 16)[0])
    body = serialise(Tokens(Triplane(planes["xy"], planes["yt"], planes["xt"]), {"frames_per_clip": "8", **meta}),
                     "safetensors")
    response = client.post("/v1/decode", content=body, headers={"content-type": "application/vnd.coordtok.tokens+safetensors"})
    assert response.status_code == 422 and message in response.json()["error"]["message"], response.text
