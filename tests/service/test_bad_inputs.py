"""A corpus of bad videos and malformed token files, made here, sent through the real app: each
gets its documented 4xx (413 too large, 415 not a video or an unsupported token type, 422 damaged
or inconsistent) or, where it is valid, succeeds; never a 5xx; and the server keeps serving (a
normal request after each one succeeds)."""
import io
import json
import struct
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as save_safetensors

from coordtok.model import CoordTok, Triplane, save_model
from coordtok.service.app import create_app
from coordtok.service.settings import Settings
from coordtok.formats.tokens import Tokens, serialise
from tests.service.test_app import video_file
from tests.service.test_engine import CONFIG
from tests.formats.test_video import encode, make_bad_file, ramp_video, raw_h264

TOKEN_TYPES = {"safetensors": "application/vnd.coordtok.tokens+safetensors", "npz": "application/x-npz",
               "json": "application/json"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    save_model(CoordTok(CONFIG), folder / "small.safetensors")
    # Frames up to 128x128 here, so that a stream whose frames outgrow its header stays cheap.
    settings = Settings(model=str(folder / "small.safetensors"), devices=["cpu"], batch_wait_ms=0, generator="none",
                        max_width=128, max_height=128, upload_dir=folder)
    with TestClient(create_app(settings)) as c:
        yield c
    assert [p.name for p in folder.glob("coordtok-*")] == []  # no upload left behind


def still_serving(client) -> None:
    assert client.get("/readyz").status_code == 200
    assert client.post("/v1/encode", content=video_file(8), headers={"content-type": "video/mp4"}).status_code == 200


def mp4(folder, frames: int = 12, faststart: bool = False) -> bytes:
    path = folder / f"{frames}-{faststart}.mp4"  # faststart rewrites the file: a path, not a buffer
    encode(path, ramp_video(frames, 48, 64), container_options={"movflags": "faststart"} if faststart else {})
    return path.read_bytes()


def webm(frames: int = 12) -> bytes:
    buffer = io.BytesIO()
    encode(buffer, ramp_video(frames, 48, 64), codec="libvpx-vp9", fmt="webm")
    return buffer.getvalue()


def mkv(frames: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    encode(buffer, frames, codec="ffv1", fmt="matroska", **options)
    return buffer.getvalue()


def h264_8192() -> bytes:
    """One black 8192x8192 H.264 frame at the lowest quality: 0.2 MB, well past the size limit."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(1), options={"preset": "ultrafast", "crf": "51"})
        stream.width = stream.height = 8192
        stream.pix_fmt = "yuv420p"
        frame = av.VideoFrame(8192, 8192, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def y4m(width: int, height: int, data: bytes) -> bytes:
    """A YUV4MPEG2 stream: its text header alone sets the frame size."""
    return f"YUV4MPEG2 W{width} H{height} F25:1 Ip A1:1 C420jpeg\n".encode() + b"FRAME\n" + data


def audio_only(tmp_path) -> bytes:
    return make_bad_file("audio_only", tmp_path, None).read_bytes()


def test_bad_and_unusual_videos(client, tmp_path):
    good, fast, vp9 = mp4(tmp_path), mp4(tmp_path, faststart=True), webm()
    grey = np.stack([np.tile(np.linspace(16, 235, 33).astype(np.uint8), (31, 1))] * 5)
    ten_bit = io.BytesIO()
    encode(ten_bit, np.full((5, 48, 64, 3), 120, np.uint8), fmt="mp4", pix_fmt="yuv420p10le")
    cases = [  # (name, body, content type, expected status, expected n_frames when 200)
        ("zero bytes", b"", "video/mp4", 422, None),
        ("text named mp4", b"this is not a video\n" * 20, "video/mp4", 415, None),
        ("random bytes", np.random.default_rng(0).bytes(5000), "application/octet-stream", 415, None),
        *[(f"{name} cut at {share:.0%}", data[: int(len(data) * share)], "video/mp4", 422, None)
          for name, data in (("mp4", good), ("faststart mp4", fast)) for share in (0.01, 0.1, 0.25, 0.5, 0.75, 0.9)],
        *[(f"webm cut at {share:.0%}", vp9[: int(len(vp9) * share)], "video/webm", 422, None) for share in (0.05, 0.1, 0.25)],
        *[(f"webm cut at {share:.0%}", vp9[: int(len(vp9) * share)], "video/webm", 200, None)  # the frames before the cut
          for share in (0.7, 0.9)],
        ("webm sent as text/plain", vp9, "text/plain", 200, [8, 8]),
        ("mp4 sent as video/webm", good, "video/webm", 200, [8, 8]),
        ("8192x8192 H.264", h264_8192(), "video/mp4", 413, None),
        ("y4m header claims 8192x8192", y4m(8192, 8192, b"\x10" * 4096), "application/octet-stream", 413, None),
        ("header 64x48, frames 160x120", raw_h264(64, 48, 4, 50) + raw_h264(160, 120, 4, 200), "application/octet-stream", 413, None),
        ("audio only", audio_only(tmp_path), "video/mp4", 415, None),
        ("single frame", mp4(tmp_path, frames=1), "video/mp4", 200, [1]),
        ("odd size 97x61", mkv(np.full((5, 61, 97, 3), 90, np.uint8)), "video/x-matroska", 200, [5]),
        ("variable frame rate", mkv(ramp_video(6, 24, 32), times_ms=[0, 40, 200, 240, 600, 640]), "video/x-matroska", 200, None),
        ("grayscale", mkv(grey, pix_fmt="gray", in_format="gray"), "video/x-matroska", 200, [5]),
        ("10-bit", ten_bit.getvalue(), "video/mp4", 200, [5]),
    ]
    for name, body, kind, status, n_frames in cases:
        response = client.post("/v1/encode?format=json", content=body, headers={"content-type": kind})
        assert response.status_code == status, (name, response.status_code, response.text[:300])
        if status == 200:
            if n_frames is not None:
                assert response.json()["metadata"]["n_frames"] == n_frames, name  # a plain JSON list
        else:
            error = response.json()["error"]
            assert error["message"] and error["type"] in ("CorruptMedia", "UnsupportedMedia", "MediaTooLarge", "UploadError"), name
        still_serving(client)
    # The same as a multipart upload with a misleading file name and type.
    response = client.post("/v1/encode", files={"file": ("notes.txt", good, "text/plain")})
    assert response.status_code == 200


def planes(clips: int = 1, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(clips, 4, 4, 4, generator=g), torch.randn(clips, 8, 4, 4, generator=g),
            torch.randn(clips, 8, 4, 4, generator=g)]


def tokens_file(fmt: str = "safetensors", meta: dict | None = None, xy=None) -> bytes:
    xy_plane, yt, xt = planes()
    return serialise(Tokens(Triplane(xy if xy is not None else xy_plane, yt, xt), meta or {}), fmt)


def safetensors_header(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def malformed_token_files() -> list[tuple[str, bytes, str, int]]:
    good = tokens_file()
    xy, yt, xt = (p.numpy() for p in planes())
    entry = lambda dtype, shape: {"dtype": dtype, "shape": shape, "data_offsets": [0, 4]}  # noqa: E731
    nan, inf = np.full_like(xy, np.nan), np.full_like(xy, np.inf)
    return [
        ("empty", b"", "safetensors", 422),
        *[(f"safetensors cut at {cut}", good[:cut], "safetensors", 422) for cut in (4, 8, 100, len(good) - 50)],
        ("header length 2^63", struct.pack("<Q", 2**63) + b"{}", "safetensors", 422),
        ("header a list", safetensors_header([1, 2]), "safetensors", 422),
        ("header entries not objects", safetensors_header({"xy": 1, "yt": 2, "xt": 3}), "safetensors", 422),
        ("shape not a list", safetensors_header({n: entry("F32", 5) for n in ("xy", "yt", "xt")}, b"\0" * 4), "safetensors", 422),
        ("huge declared shape", safetensors_header({n: entry("F32", [2**40, 4, 4, 4]) for n in ("xy", "yt", "xt")}, b"\0" * 4), "safetensors", 422),
        ("offsets past the data", safetensors_header({n: {"dtype": "F32", "shape": [1, 4, 4, 4], "data_offsets": [0, 10**12]}
                                                      for n in ("xy", "yt", "xt")}), "safetensors", 422),
        ("metadata a list", safetensors_header({"__metadata__": [1], "xy": {}, "yt": {}, "xt": {}}), "safetensors", 422),
        *[(f"dtype {name}", save_safetensors({"xy": torch.from_numpy(xy).to(dtype), "yt": torch.from_numpy(yt), "xt": torch.from_numpy(xt)}),
           "safetensors", 422) for name, dtype in [("I32", torch.int32), ("U8", torch.uint8), ("F64", torch.float64), ("BOOL", torch.bool)]],
        ("NaN plane", tokens_file(xy=torch.from_numpy(nan)), "safetensors", 422),
        ("Inf plane", tokens_file(xy=torch.from_numpy(inf)), "npz", 422),
        ("wrong plane shape", tokens_file(xy=torch.zeros(1, 4, 4, 5)), "safetensors", 422),
        ("planes with different clip counts", save_safetensors({"xy": torch.zeros(2, 4, 4, 4), "yt": torch.from_numpy(yt),
                                                                "xt": torch.from_numpy(xt)}), "safetensors", 422),
        ("too many clips", serialise(Tokens(Triplane(*planes(clips=65)), {}), "safetensors"), "safetensors", 422),
        ("a missing plane", save_safetensors({"xy": torch.from_numpy(xy), "yt": torch.from_numpy(yt)}), "safetensors", 422),
        ("npz cut short", tokens_file("npz")[:200], "npz", 422),
        ("npz of pickled objects", npz(xy=np.array([object()], dtype=object), yt=yt, xt=xt), "npz", 422),
        ("npz of ints", npz(xy=xy.astype(np.int32), yt=yt, xt=xt), "npz", 422),
        ("npz of complex", npz(xy=xy.astype(np.complex64), yt=yt, xt=xt), "npz", 422),
        ("npz metadata a list", npz(xy=xy, yt=yt, xt=xt, __metadata__=np.array("[1, 2]")), "npz", 422),
        ("npz metadata nested 10^5 deep", npz(xy=xy, yt=yt, xt=xt, __metadata__=np.array("[" * 100_000)), "npz", 422),
        ("json NaN", tokens_file("json").replace(b"[[[[", b"[[[[NaN, ", 1), "json", 422),
        ("json Infinity", json.dumps({"xy": np.full_like(xy, 1e400).tolist(), "yt": yt.tolist(), "xt": xt.tolist()}).encode(), "json", 422),
        ("json nested 10^5 deep", b"[" * 100_000, "json", 422),
        ("json ragged", json.dumps({"xy": [[1.0], [1.0, 2.0]], "yt": yt.tolist(), "xt": xt.tolist()}).encode(), "json", 422),
        ("json strings", json.dumps({"xy": "abc", "yt": yt.tolist(), "xt": xt.tolist()}).encode(), "json", 422),
        ("json not an object", b"[1, 2, 3]", "json", 422),
        ("json metadata a list", json.dumps({"xy": xy.tolist(), "yt": yt.tolist(), "xt": xt.tolist(), "metadata": [1]}).encode(), "json", 422),
        ("n_frames 1e400", tokens_file(meta={"n_frames": "[1e400]"}), "safetensors", 422),
        ("n_frames too many", tokens_file(meta={"n_frames": "[8, 8]"}), "safetensors", 422),
        ("n_frames 0", tokens_file(meta={"n_frames": "[0]"}), "safetensors", 422),
        ("fps text", tokens_file(meta={"fps": "fast"}), "safetensors", 422),
        ("fps inf", tokens_file(meta={"fps": "inf"}), "safetensors", 422),
        ("another model's tokens", tokens_file(meta={"model_id": "other@123"}), "safetensors", 422),
        ("a content type that is no token format", good, "text/plain", 415),
    ]


def test_malformed_token_files(client):
    for name, body, fmt, status in malformed_token_files():
        kind = TOKEN_TYPES.get(fmt, fmt)
        response = client.post("/v1/decode?format=npy", content=body, headers={"content-type": kind})
        assert response.status_code == status, (name, response.status_code, response.text[:300])
        assert response.json()["error"]["message"], name
        still_serving(client)


def test_restoring_to_an_absurd_source_size_is_refused(client):
    geometry = json.dumps({"policy": "pad", "scaled": [16, 16], "crop": [0, 0, 16, 16], "pad": [0, 0, 16, 16]})
    for meta, message in [
        ({"geometry": geometry, "source_size": "[100000, 100000]"}, "limit"),
        ({"geometry": geometry.replace('"pad": [0, 0, 16, 16]', '"pad": [0, 0, 16, 99]'), "source_size": "[16, 16]"}, "pad box"),
        ({"geometry": "[]", "source_size": "[16, 16]"}, "geometry"),
        ({"geometry": geometry, "source_size": "[16.5, 16]"}, "geometry"),
    ]:
        response = client.post("/v1/decode?format=npy&restore_size=true", content=tokens_file(meta=meta),
                               headers={"content-type": TOKEN_TYPES["safetensors"]})
        assert response.status_code == 422 and message in response.json()["error"]["message"], (meta, response.status_code, response.text[:200])
    ok = client.post("/v1/decode?format=npy&restore_size=true", headers={"content-type": TOKEN_TYPES["safetensors"]},
                     content=tokens_file(meta={"geometry": geometry, "source_size": "[20, 24]"}))
    assert ok.status_code == 200 and np.load(io.BytesIO(ok.content)).shape == (8, 20, 24, 3)
