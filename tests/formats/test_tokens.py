"""Token files: every format round-trips; malformed files are refused with a message."""
import io
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from coordtok.model import Triplane, preset
from coordtok.formats.tokens import FORMATS, Resize, TokenError, TokenMetadata, Tokens, parse, serialise

CONFIG = preset("coordtok-tiny")  # xy [16, 16, 8], yt/xt [32, 16, 8]


def tokens(clips: int = 2) -> Tokens:
    g = torch.Generator().manual_seed(clips)
    planes = [torch.randn(clips, 16, 16, 8, generator=g), torch.randn(clips, 32, 16, 8, generator=g), torch.randn(clips, 32, 16, 8, generator=g)]
    return Tokens(Triplane(*planes), {"model_id": "tiny@abc", "frames_per_clip": "128"})


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_round_trips(fmt):
    original = tokens()
    parsed = parse(serialise(original, fmt), fmt, CONFIG, max_clips=4, model_id="tiny@abc")
    assert parsed.metadata == original.metadata and parsed.clips == 2
    for a, b in zip(parsed.triplane.planes(), original.triplane.planes()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 if fmt == "json" else 0)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_wrong_shape_names_the_expected_one(fmt):
    bad = tokens()
    bad.triplane = Triplane(bad.triplane.xy, bad.triplane.yt[:, :16], bad.triplane.xt)
    with pytest.raises(TokenError, match=r"'yt' has shape \[2, 16, 16, 8\]; this model expects \[clips, 32, 16, 8\]"):
        parse(serialise(bad, fmt), fmt, CONFIG, max_clips=4)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_nan_tokens_are_refused(fmt):
    bad = tokens()
    bad.triplane.xt[1, 3, 4, 5] = float("nan")
    with pytest.raises(TokenError, match="NaN or Inf"):
        parse(serialise(bad, fmt), fmt, CONFIG, max_clips=4)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_too_many_clips_are_refused(fmt):
    with pytest.raises(TokenError, match="between 1 and 1 are accepted"):
        parse(serialise(tokens(2), fmt), fmt, CONFIG, max_clips=1)


def test_tokens_of_another_model_are_refused():
    with pytest.raises(TokenError, match="made by model 'tiny@abc'"):
        parse(serialise(tokens(), "safetensors"), "safetensors", CONFIG, max_clips=4, model_id="other@123")


def test_integer_planes_are_refused():
    t = tokens()
    data = save_safetensors({"xy": t.triplane.xy.int(), "yt": t.triplane.yt, "xt": t.triplane.xt})
    with pytest.raises(TokenError, match="dtype I32"):
        parse(data, "safetensors", CONFIG, max_clips=4)


def test_a_missing_plane_is_named():
    data = json.dumps({"xy": tokens().triplane.xy.tolist(), "yt": []}).encode()
    with pytest.raises(TokenError, match=r"lacks the planes \['xt'\]"):
        parse(data, "json", CONFIG, max_clips=4)


def test_huge_declared_shape_is_refused_before_reading_data():
    header = json.dumps({name: {"dtype": "F32", "shape": [10**9, *shape], "data_offsets": [0, 4]}
                         for name, shape in [("xy", (16, 16, 8)), ("yt", (32, 16, 8)), ("xt", (32, 16, 8))]}).encode()
    data = struct.pack("<Q", len(header)) + header + b"\0" * 4
    with pytest.raises(TokenError, match="holds 1000000000 clips"):
        parse(data, "safetensors", CONFIG, max_clips=8)


@pytest.mark.parametrize("fmt,cut", [("safetensors", 4), ("safetensors", 200), ("safetensors", -100), ("npz", 50), ("npz", -100), ("json", -3)])
def test_truncated_files_are_refused(fmt, cut):
    data = serialise(tokens(), fmt)
    with pytest.raises(TokenError):
        parse(data[:cut], fmt, CONFIG, max_clips=4)


def test_npz_with_pickled_objects_is_refused():
    buffer = io.BytesIO()
    t = tokens()
    np.savez(buffer, xy=np.array([object()], dtype=object), yt=t.triplane.yt.numpy(), xt=t.triplane.xt.numpy())
    with pytest.raises(TokenError, match="dtype object"):
        parse(buffer.getvalue(), "npz", CONFIG, max_clips=4)


def _safetensors_with_header(header) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize("fmt,data", [
    ("safetensors", _safetensors_with_header([1, 2])),
    ("safetensors", _safetensors_with_header({"xy": 1, "yt": 2, "xt": 3})),
    ("safetensors", _safetensors_with_header({n: {"dtype": "F32", "shape": 5, "data_offsets": [0, 4]} for n in ("xy", "yt", "xt")})),
    ("safetensors", _safetensors_with_header({"__metadata__": [1], "xy": {}, "yt": {}, "xt": {}})),
    ("json", b"[" * 100_000),
    ("npz", None),  # metadata that is JSON but not an object
])
def test_malformed_headers_and_metadata_are_token_errors(fmt, data):
    if data is None:
        buffer = io.BytesIO()
        t = tokens()
        np.savez(buffer, xy=t.triplane.xy.numpy(), yt=t.triplane.yt.numpy(), xt=t.triplane.xt.numpy(), __metadata__=np.array("[1]"))
        data = buffer.getvalue()
    with pytest.raises(TokenError):
        parse(data, fmt, CONFIG, max_clips=4)


def test_the_largest_acceptable_file_fits_the_body_bound():
    from coordtok.formats.tokens import largest_file_bytes

    biggest = tokens(4)
    for fmt in FORMATS:
        assert len(serialise(biggest, fmt)) < largest_file_bytes(CONFIG, 4)
    indented = json.dumps(json.loads(serialise(biggest, "json")), indent=4).encode()
    assert len(indented) < largest_file_bytes(CONFIG, 4) - (1 << 20)  # within the per-value share alone


ENCODED = {"model_id": "tiny@abc", "frames_per_clip": "128", "n_frames": "[128, 41]", "fps": "29.97",
           "source_size": "[465, 640]", "weights_sha256": "12e45",  # a string that also parses as a number
           "geometry": json.dumps({"policy": "pad", "scaled": [94, 128], "crop": [0, 0, 94, 128], "pad": [17, 0, 94, 128]})}


@pytest.mark.parametrize("fmt", ["npz", "json"])
def test_npz_and_json_metadata_are_plain_json_values_and_read_back_as_before(fmt):
    original = tokens()
    original.metadata = ENCODED
    data = serialise(original, fmt)
    if fmt == "json":
        written = json.loads(data)["metadata"]
    else:
        with np.load(io.BytesIO(data)) as archive:
            written = json.loads(str(archive["__metadata__"]))
    assert written["n_frames"] == [128, 41] and written["geometry"]["pad"] == [17, 0, 94, 128]
    assert written["frames_per_clip"] == 128 and written["fps"] == 29.97
    assert written["model_id"] == "tiny@abc" and written["weights_sha256"] == "12e45"  # not turned into 1.2e+46
    assert parse(data, fmt, CONFIG, max_clips=4).metadata == ENCODED


@pytest.mark.parametrize("fmt", ["npz", "json"])
def test_files_with_json_encoded_metadata_strings_still_read(fmt):
    """Older servers wrote "n_frames": "[128, 41]" in npz and JSON files too."""
    planes = {name: plane.numpy() for name, plane in zip(("xy", "yt", "xt"), tokens().triplane.planes())}
    if fmt == "json":
        data = json.dumps({"metadata": ENCODED, **{k: v.tolist() for k, v in planes.items()}}).encode()
    else:
        buffer = io.BytesIO()
        np.savez(buffer, **planes, __metadata__=np.array(json.dumps(ENCODED)))
        data = buffer.getvalue()
    assert parse(data, fmt, CONFIG, max_clips=4).metadata == ENCODED


def test_the_same_tokens_give_the_same_bytes_whatever_the_metadata_order():
    first, second = tokens(), tokens()
    first.metadata = dict(ENCODED)
    second.metadata = dict(reversed(list(ENCODED.items())))
    for fmt in FORMATS:
        assert serialise(first, fmt) == serialise(second, fmt), fmt


def typed_metadata() -> TokenMetadata:
    return TokenMetadata(model_id="42", weights_sha256="12e45", frames_per_clip=8, n_frames=(8, 5), clip_starts=(0, 8),
                         clip_policy="stretch", source_fps=29.97, fps=25.0, source_size=(465, 640),
                         geometry=Resize("pad", (94, 128), (0, 0, 94, 128), (17, 0, 94, 128)), extra={"seed": "5"})


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_typed_metadata_round_trips_and_json_files_hold_json_types(fmt):
    original = tokens()
    original.metadata = typed_metadata()
    data = serialise(original, fmt)
    parsed = parse(data, fmt, CONFIG, max_clips=4).metadata
    assert parsed == original.metadata
    assert (parsed.n_frames, parsed.clip_starts, parsed.source_size) == ((8, 5), (0, 8), (465, 640))
    assert (parsed.frames_per_clip, parsed.fps, parsed.source_fps) == (8, 25.0, 29.97)
    assert parsed.geometry == typed_metadata().geometry and parsed.extra == {"seed": "5"} and not parsed.unreadable
    if fmt == "json":
        written = json.loads(data)["metadata"]
        assert written["n_frames"] == [8, 5] and written["source_size"] == [465, 640] and written["fps"] == 25
        assert written["geometry"] == {"policy": "pad", "scaled": [94, 128], "crop": [0, 0, 94, 128], "pad": [17, 0, 94, 128]}
        assert written["model_id"] == "42" and written["weights_sha256"] == "12e45"  # text fields stay strings


def test_old_style_files_read_as_typed_metadata():
    """Older servers wrote every value as a string, in JSON files too; safetensors holds strings by format."""
    planes = {name: plane.numpy() for name, plane in zip(("xy", "yt", "xt"), tokens().triplane.planes())}
    old_json = json.dumps({"metadata": ENCODED, **{k: v.tolist() for k, v in planes.items()}}).encode()
    old_safetensors = save_safetensors({k: torch.from_numpy(v) for k, v in planes.items()}, metadata=ENCODED)
    for fmt, data in [("json", old_json), ("safetensors", old_safetensors)]:
        meta = parse(data, fmt, CONFIG, max_clips=4).metadata
        assert (meta.model_id, meta.weights_sha256, meta.frames_per_clip, meta.n_frames) == ("tiny@abc", "12e45", 128, (128, 41))
        assert (meta.fps, meta.source_size, meta.geometry.pad) == (29.97, (465, 640), (17, 0, 94, 128)), fmt
        assert meta.clip_starts is None and meta.clip_layout(2, 128).starts == (0, 128)  # placed by the running sum
        assert meta.source_geometry((128, 128)).source == (465, 640)


def test_unreadable_entries_round_trip_and_are_refused_where_used():
    meta = TokenMetadata.read({"n_frames": "[1e400]", "fps": "fast", "geometry": "[]", "source_size": "[16, 16]"})
    assert dict(meta.unreadable) == {"n_frames": "[1e400]", "fps": "fast", "geometry": "[]"}
    assert parse(serialise(Tokens(tokens().triplane, meta), "safetensors"), "safetensors", CONFIG, max_clips=4).metadata == meta
    with pytest.raises(TokenError, match="JSON lists of frame counts"):
        meta.clip_layout(2, 8)
    with pytest.raises(TokenError, match="got 'fast'"):
        meta.frame_rate()
    assert meta.source_geometry((16, 16)) is None
    assert TokenMetadata().frame_rate() == 25.0 and TokenMetadata(fps=0.01).source_geometry((16, 16)) is None
    with pytest.raises(TokenError, match="from 0.1 to 1000, got '0.01'"):
        TokenMetadata(fps=0.01).frame_rate()
