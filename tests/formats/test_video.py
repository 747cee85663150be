"""formats.video, formats.geometry and formats.video_write: probing, decoding, resizing and restoring,
time selection, limits, typed errors, encoding."""
import io
from fractions import Fraction

import av
import numpy as np
import pytest

from coordtok.formats.geometry import plan_geometry
from coordtok.formats.video import (CorruptMedia, MediaLimits, MediaTooLarge, UnsupportedMedia, iter_frames, probe,
                                    read_frames)
from coordtok.formats.video_write import write_video


def ramp_video(frames: int, height: int, width: int) -> np.ndarray:
    """uint8 [T, H, W, 3] (T <= 70): frame i is grey 3 * i plus a fixed colour gradient, so that
    frames are told apart by their mean and the codec has some texture to keep."""
    y = np.linspace(0, 20, height)[:, None, None]
    x = np.linspace(0, 20, width)[None, :, None]
    base = (y + x * np.array([1.0, 0.5, 0.0])).astype(np.uint8)
    return np.stack([base + np.uint8(3 * i) for i in range(frames)])


def encode(path, frames: np.ndarray, fps: float = 30, codec: str = "libx264", pix_fmt: str = "yuv420p",
           in_format: str = "rgb24", fmt: str | None = None, options: dict | None = None,
           times_ms: list[int] | None = None, container_options: dict | None = None) -> None:
    """Encode `frames` with PyAV directly (codecs and pixel formats write_video does not offer);
    `times_ms` gives each frame's timestamp for a variable frame rate. Tests that cut files need
    the same bytes every time, so one encoder thread (x264's threaded output varies with the
    machine's load) and, for x264, no assembly: on these CI machines its AVX-512 code now and
    then encodes differently under load (of 1,200 encodes under two busy loops, 15 differed;
    with AVX2 only or without assembly, none did), as if the virtual machine lost vector state."""
    x264 = {"x264-params": "asm=0"} if codec == "libx264" else {}
    with av.open(path, "w", format=fmt, options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps), options={"threads": "1", **x264, **(options or {})})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if times_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format=in_format)
            if times_ms is not None:
                frame.pts, frame.time_base = times_ms[i], Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def decoded_change(one: bytes, two: bytes) -> np.ndarray:
    """|the decoded frames of video file `one` - those of `two`|, float [T, H, W, 3]; ValueError
    when their shapes differ."""
    first, second = (read_frames(io.BytesIO(data))[0].astype(float) for data in (one, two))
    if first.shape != second.shape:
        raise ValueError(f"frames {first.shape} against {second.shape}")
    return np.abs(first - second)


def same_video(one: bytes, two: bytes) -> bool:
    """Whether two video files hold the same frames as far as x264 repeats itself: the same bytes,
    or, where their bytes differ (see `encode`), decoded frames within 2 levels of each other on
    average (two encodes of the same frames: 0.19 measured; another video: tens)."""
    if one == two:
        return True
    try:
        return float(decoded_change(one, two).mean()) < 2
    except ValueError:
        return False


def frame_means(video: np.ndarray) -> np.ndarray:
    return video.reshape(len(video), -1).mean(axis=1)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 30 fps H.264 MP4 of 60 frames at 64x48 with a keyframe every 8 frames (so seeks land
    mid-clip) and B-frames; returns (path, full decode [60, 48, 64, 3])."""
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    encode(path, ramp_video(60, 48, 64), options={"g": "8", "bf": "2"})
    return path, read_frames(path)[0]


@pytest.fixture(scope="module")
def odd_clip(tmp_path_factory):
    """An FFV1 MKV of 10 frames at 97x61 (H.264 in yuv420p cannot hold odd sizes): a mid-grey
    frame, so the black bars of `pad` stand out."""
    path = tmp_path_factory.mktemp("media") / "odd.mkv"
    encode(path, np.full((10, 61, 97, 3), 128, np.uint8), codec="ffv1")
    return path


def test_probe_reads_the_header(clip):
    info = probe(clip[0])
    assert (info.width, info.height, info.frames, info.codec, info.pix_fmt) == (64, 48, 60, "h264", "yuv420p")
    assert info.fps == pytest.approx(30)
    assert info.duration_s == pytest.approx(2.0, abs=0.04)
    assert info.frames_at(15) == 30


def test_full_decode_matches_the_source(clip):
    path, video = clip
    assert video.shape == (60, 48, 64, 3) and video.dtype == np.uint8
    np.testing.assert_allclose(frame_means(video), frame_means(ramp_video(60, 48, 64)), atol=2)


@pytest.mark.parametrize(
    "policy, scaled, crop, pad",
    [
        ("crop", (32, 51), (0, 9, 32, 32), (0, 0, 32, 32)),
        ("pad", (20, 32), (0, 0, 20, 32), (6, 0, 20, 32)),
        ("stretch", (32, 32), (0, 0, 32, 32), (0, 0, 32, 32)),
    ],
)
def test_geometry_of_an_odd_source(odd_clip, policy, scaled, crop, pad):
    # 61x97 -> 32x32: crop scales the short side (height) to 32, width 97 * 32 / 61 = 50.9 -> 51;
    # pad scales the long side (width) to 32, height 61 * 32 / 97 = 20.1 -> 20.
    video, info, geometry = read_frames(odd_clip, size=(32, 32), resize=policy)
    assert geometry == plan_geometry((61, 97), (32, 32), policy)
    assert (geometry.source, geometry.scaled, geometry.crop, geometry.pad) == ((61, 97), scaled, crop, pad)
    assert video.shape == (10, 32, 32, 3) and (info.width, info.height) == (97, 61)
    top, left, h, w = geometry.pad
    inside = np.zeros((32, 32), bool)
    inside[top:top + h, left:left + w] = True
    assert np.all(np.abs(video[:, inside].astype(int) - 128) <= 2)
    assert np.all(video[:, ~inside] == 0)  # pad's bars are black; the others have none


def test_geometry_of_a_wide_source_and_no_resize():
    assert plan_geometry((48, 64), (32, 32), "crop").crop == (0, 5, 32, 32)  # 64 * 32 / 48 = 42.7 -> 43
    assert plan_geometry((48, 64), (32, 32), "pad").pad == (4, 0, 24, 32)
    same = plan_geometry((61, 97), None)
    assert same.output == same.scaled == (61, 97) and same.crop == same.pad == (0, 0, 61, 97)
    with pytest.raises(ValueError):
        plan_geometry((48, 64), (32, 32), "zoom")


def test_fps_resampling_picks_the_nearest_frames(clip):
    path, video = clip
    half, _, _ = read_frames(path, fps=15)
    assert half.shape[0] == 30
    np.testing.assert_array_equal(half, video[::2])
    up, _, _ = read_frames(path, fps=45)  # frame k is source frame round(k * 30 / 45): repeats
    assert up.shape[0] == 90
    np.testing.assert_array_equal(up, video[np.round(np.arange(90) * 30 / 45).astype(int)])


def test_time_range_seeks_to_the_same_frames_as_a_full_decode(clip):
    path, video = clip
    part, _, _ = read_frames(path, start_s=0.5, end_s=1.5)
    np.testing.assert_array_equal(part, video[15:45])
    # On the 15 fps grid, 0.5 s falls between grid frames 7 and 8: the range starts at 8.
    grid, _, _ = read_frames(path, fps=15, start_s=0.5, max_frames=5)
    np.testing.assert_array_equal(grid, video[::2][8:13])
    past, _, geometry = read_frames(path, size=(24, 32), start_s=5.0)
    assert past.shape == (0, 24, 32, 3) and geometry.output == (24, 32)


def test_iter_frames_yields_what_read_frames_returns(clip):
    path, video = clip
    frames = list(iter_frames(path, size=(24, 32), resize="pad", fps=10))
    stacked, _, _ = read_frames(path, size=(24, 32), resize="pad", fps=10)
    assert len(frames) == 20 and frames[0].shape == (24, 32, 3)
    np.testing.assert_array_equal(np.stack(frames), stacked)


def test_variable_frame_rate_resamples_by_timestamp(tmp_path):
    path = tmp_path / "vfr.mkv"
    values = np.arange(8) * 30
    encode(path, np.repeat(values.astype(np.uint8), 24 * 32 * 3).reshape(8, 24, 32, 3), codec="ffv1",
           times_ms=[0, 40, 80, 200, 240, 400, 580, 640])
    video, _, _ = read_frames(path, fps=10, max_frames=7)
    # Grid times 0.0 .. 0.6 s -> nearest frames at 0, 80, 200, 240, 400, 580, 580 ms.
    picked = np.round(video[:, 0, 0, 0] / 30).astype(int)  # RGB -> YUV -> RGB is off by one at most
    np.testing.assert_array_equal(picked, [0, 2, 3, 4, 5, 6, 6])


def raw_h264(width: int, height: int, frames: int, value: int) -> bytes:
    """An Annex-B H.264 elementary stream: no container, so no timestamps, duration or count."""
    buffer = io.BytesIO()
    encode(buffer, np.full((frames, height, width, 3), value, np.uint8), fmt="h264")
    return buffer.getvalue()


def test_stream_without_timestamps_falls_back_to_frame_index(tmp_path):
    path = tmp_path / "raw.h264"
    path.write_bytes(raw_h264(64, 48, 20, 90))
    info = probe(path)
    assert (info.frames, info.duration_s) == (0, 0.0)
    assert read_frames(path)[0].shape == (20, 48, 64, 3)
    assert read_frames(path, fps=info.fps / 2)[0].shape == (10, 48, 64, 3)


def test_limits_are_enforced_while_decoding_when_the_header_understates(tmp_path):
    # Two concatenated streams: the header describes the first (64x48), then frames grow to 128x96.
    path = tmp_path / "grows.h264"
    path.write_bytes(raw_h264(64, 48, 10, 50) + raw_h264(128, 96, 10, 200))
    small = MediaLimits(max_width=100)
    assert probe(path, small).width == 64
    with pytest.raises(MediaTooLarge, match="128x96"):
        read_frames(path, small)
    with pytest.raises(MediaTooLarge, match="frames"):
        read_frames(path, MediaLimits(max_frames=15))
    with pytest.raises(MediaTooLarge, match="0.5 s"):
        read_frames(path, MediaLimits(max_duration_s=0.5))
    video, _, _ = read_frames(path)  # without limits, later frames are scaled to the first size
    assert video.shape == (20, 48, 64, 3)


@pytest.mark.parametrize(
    "limits", [MediaLimits(max_width=32), MediaLimits(max_pixels=1000), MediaLimits(max_frames=59),
               MediaLimits(max_duration_s=1.0)]
)
def test_header_over_the_limits_is_refused_before_decoding(clip, limits):
    with pytest.raises(MediaTooLarge, match="over the limit"):
        probe(clip[0], limits)


def test_the_limits_apply_to_the_part_read(clip):
    """A 2 s, 60-frame clip over limits of 1 s or 40 frames: refused whole, read up to an `end_s` or
    `max_frames` that stops within them (decoding stops there), refused for a part reaching past."""
    path, full = clip
    one_second, forty_frames = MediaLimits(max_duration_s=1.0), MediaLimits(max_frames=40)
    for limits in (one_second, forty_frames):
        with pytest.raises(MediaTooLarge, match="over the limit"):
            read_frames(path, limits)
        assert np.array_equal(read_frames(path, limits, end_s=1.0)[0], full[:30])
        assert np.array_equal(read_frames(path, limits, max_frames=20)[0], full[:20])
    assert len(read_frames(path, one_second, fps=10, max_frames=5)[0]) == 5  # to 0.5 s
    with pytest.raises(MediaTooLarge, match="the part asked for ends at 1.5 s, over the limit of 1 s"):
        read_frames(path, one_second, start_s=0.5, end_s=1.5)
    with pytest.raises(MediaTooLarge, match="the part asked for holds about 45 frames, over the limit of 40"):
        read_frames(path, forty_frames, end_s=1.5)
    with pytest.raises(MediaTooLarge, match="the video lasts 2.0 s, over the limit of 1 s"):
        probe(path, one_second)


def test_grayscale_decodes_to_equal_rgb_channels(tmp_path):
    path = tmp_path / "gray.mkv"
    gradient = np.tile(np.linspace(16, 235, 65).astype(np.uint8), (47, 1))
    encode(path, np.stack([gradient] * 5), codec="ffv1", pix_fmt="gray", in_format="gray")
    video, info, _ = read_frames(path)
    assert info.pix_fmt == "gray" and video.shape == (5, 47, 65, 3)
    assert np.array_equal(video[..., 0], video[..., 1]) and np.array_equal(video[..., 0], video[..., 2])
    assert np.abs(video[..., 0].astype(int) - gradient).max() <= 1


@pytest.mark.parametrize("codec, suffix, size", [("libx264", "mp4", (48, 64)), ("ffv1", "mkv", (47, 65))])
def test_10_bit_decodes_to_8_bit_rgb(tmp_path, codec, suffix, size):
    path = tmp_path / f"p10.{suffix}"
    colour = np.array([200, 100, 30], np.uint8)
    encode(path, np.broadcast_to(colour, (5, *size, 3)).copy(), codec=codec, pix_fmt="yuv420p10le")
    video, info, _ = read_frames(path)
    assert info.pix_fmt == "yuv420p10le" and video.shape == (5, *size, 3) and video.dtype == np.uint8
    np.testing.assert_allclose(video.reshape(-1, 3).mean(axis=0), colour, atol=3)


def make_bad_file(kind: str, folder, good_mp4) -> object:
    path = folder / f"{kind}.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a video\n" * 20)
    elif kind == "truncated":  # index (moov) at the end: it is cut off
        data = good_mp4.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_faststart":  # index first: the frames are cut off
        whole = folder / "faststart.mp4"
        encode(whole, ramp_video(30, 48, 64), container_options={"movflags": "faststart"})
        data = whole.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "audio_only":
        with av.open(path, "w") as container:
            stream = container.add_stream("aac", rate=16000)
            for _ in range(8):
                frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                frame.sample_rate = 16000
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
    return path


@pytest.mark.parametrize(
    "kind, error",
    [
        ("empty", CorruptMedia),
        ("truncated", CorruptMedia),
        ("truncated_faststart", CorruptMedia),
        ("text", UnsupportedMedia),
        ("audio_only", UnsupportedMedia),
    ],
)
def test_bad_files_raise_typed_errors(tmp_path, clip, kind, error):
    path = make_bad_file(kind, tmp_path, clip[0])
    with pytest.raises(error) as raised:
        read_frames(path)
    assert str(raised.value)


def test_mp4_cut_at_a_frame_boundary_gives_the_frames_before_the_cut(tmp_path):
    path = tmp_path / "fast.mp4"
    # The index first, and no B-frames, so frames are stored in display order.
    encode(path, ramp_video(12, 48, 64), container_options={"movflags": "faststart"}, options={"bf": "0"})
    data = path.read_bytes()
    with av.open(path) as container:
        starts = [p.pos for p in container.demux(container.streams.video[0]) if p.size]
    cut = data[: starts[5]]  # frames 0-4 whole, nothing of frame 5
    frames = read_frames(io.BytesIO(cut))[0]
    assert len(frames) == 5
    np.testing.assert_array_equal(frames, read_frames(path)[0][:5])
    with pytest.raises(CorruptMedia):  # a cut inside frame 5's data fails to decode
        read_frames(io.BytesIO(data[: starts[5] + 3]))


def test_missing_file_is_not_a_media_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        probe(tmp_path / "nope.mp4")


@pytest.mark.parametrize("codec, suffix, decoded_size", [("h264", "mp4", (62, 98)), ("vp9", "webm", (61, 97))])
def test_write_video_round_trip(tmp_path, codec, suffix, decoded_size):
    source = ramp_video(12, 61, 97)
    path = tmp_path / f"out.{suffix}"
    write_video(source, path, fps=24, codec=codec)
    video, info, _ = read_frames(path)
    assert info.fps == pytest.approx(24) and video.shape == (12, *decoded_size, 3)
    np.testing.assert_allclose(frame_means(video[:, :61, :97]), frame_means(source), atol=2)


def test_write_video_to_a_file_object(clip):
    buffer = io.BytesIO()
    write_video(clip[1][:10], buffer, fps=30)
    buffer.seek(0)
    video, info, _ = read_frames(buffer)
    assert info.frames == 10 and video.shape == (10, 48, 64, 3)


def test_bad_arguments_raise_value_error(clip):
    with pytest.raises(ValueError):
        read_frames(clip[0], resize="zoom")
    with pytest.raises(ValueError):
        read_frames(clip[0], fps=0)
    with pytest.raises(ValueError):
        read_frames(clip[0], start_s=1.0, end_s=0.5)
    with pytest.raises(ValueError):
        write_video(np.zeros((2, 8, 8, 3), np.float32), io.BytesIO(), fps=30)
