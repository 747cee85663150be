"""formats.video_stream: files written clip by clip play back as the frames written, and their bytes
leave before the last clip is written."""
import io

import av
import numpy as np
import pytest

from coordtok.formats.video import MediaLimits, read_frames
from coordtok.formats.video_write import video_bytes
from coordtok.formats.video_stream import StreamWriter


def moving_video(frames: int, height: int, width: int) -> np.ndarray:
    """uint8 [T, H, W, 3]: a smooth pattern drifting one pixel per frame (a codec keeps it well)."""
    t = np.arange(frames)[:, None, None, None]
    y, x = np.arange(height)[None, :, None, None], np.arange(width)[None, None, :, None]
    return (127 + 90 * np.sin(0.2 * (x - t) + 0.15 * y + np.array([0.0, 1.0, 2.0]))).astype(np.uint8)


def streamed(fmt: str, video: np.ndarray, clip: int, **options) -> tuple[list[list[bytes]], bytes]:
    """Write `video` clip by clip: the chunks each clip gave, and the whole file."""
    with StreamWriter(fmt, 10, len(video), video.shape[1:3], **options) as writer:
        per_clip = [list(writer.encode(video[k:k + clip])) for k in range(0, len(video), clip)]
        last = writer.finish()
    return per_clip, b"".join(c for chunks in per_clip for c in chunks) + last


def test_npy_is_np_save_of_the_whole_video_with_its_length_known_ahead():
    video = moving_video(12, 9, 7)
    writer = StreamWriter("npy", 10, 12, (9, 7), chunk_bytes=500)
    per_clip, data = streamed("npy", video, 5, chunk_bytes=500)
    assert data == video_bytes(video, 10, "npy") and len(data) == writer.content_length
    assert np.array_equal(np.load(io.BytesIO(data)), video)
    frame = 9 * 7 * 3
    assert all(len(chunk) < 500 + frame + 128 for chunks in per_clip for chunk in chunks)  # 128: the header
    assert [sum(map(len, chunks)) for chunks in per_clip][1:] == [5 * frame, 2 * frame]  # nothing kept back


@pytest.mark.parametrize("fmt,codec,size", [("mp4", "h264", (32, 48)), ("mp4", "h264", (31, 45)), ("webm", "vp9", (31, 45))])
def test_streamed_videos_play_back_as_the_frames_written(fmt, codec, size):
    video = moving_video(48, *size)
    _, data = streamed(fmt, video, 16)
    frames, info, _ = read_frames(io.BytesIO(data), MediaLimits())
    assert info.codec == codec and frames.shape[0] == 48
    whole, _, _ = read_frames(io.BytesIO(video_bytes(video, 10, fmt)), MediaLimits())
    assert frames.shape == whole.shape  # the same sizes as write_video's (H.264: odd sides padded)
    height, width = size
    error, whole_error = (np.abs(f[:, :height, :width].astype(int) - video).mean() for f in (frames, whole))
    assert error < 1.2 * whole_error + 0.5, (error, whole_error)  # as close as write_video's (yuv420 costs ~4)


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_each_clip_starts_with_a_keyframe_and_bytes_leave_before_the_end(fmt):
    video = moving_video(6 * 32, 32, 32)
    per_clip, data = streamed(fmt, video, 32)
    with av.open(io.BytesIO(data)) as container:
        keys = [packet.is_keyframe for packet in container.demux(video=0) if packet.size]
    assert [i for i, key in enumerate(keys) if key][:6] == [0, 32, 64, 96, 128, 160]
    sent_before_last = sum(len(c) for chunks in per_clip[:-1] for c in chunks)
    assert sent_before_last > len(data) / 2  # clips leave as they are written, not at the end


def test_the_same_frames_give_the_same_bytes():
    video = moving_video(20, 16, 16)
    assert streamed("mp4", video, 8)[1] == streamed("mp4", video, 8)[1]


def test_frames_that_do_not_match_the_announcement_are_refused():
    with StreamWriter("mp4", 10, 4, (16, 16)) as writer:
        with pytest.raises(ValueError, match="uint8 \\[16, 16, 3\\]"):
            list(writer.encode(np.zeros((1, 16, 17, 3), np.uint8)))
        list(writer.encode(np.zeros((3, 16, 16, 3), np.uint8)))
        with pytest.raises(ValueError, match="3 frames were written, 4 announced"):
            writer.finish()
        with pytest.raises(ValueError, match="more frames than the 4 announced"):
            list(writer.encode(np.zeros((2, 16, 16, 3), np.uint8)))
    with pytest.raises(ValueError, match="format must be one of"):
        StreamWriter("gif", 10, 4, (16, 16))
    with pytest.raises(ValueError, match="fps"):
        StreamWriter("npy", 0.0, 4, (16, 16))


def test_encoding_stops_when_asked():
    calls = []

    def stop_after_three():
        calls.append(1)
        if len(calls) > 3:
            raise TimeoutError("stop")

    with StreamWriter("webm", 10, 10, (16, 16)) as writer, pytest.raises(TimeoutError):
        list(writer.encode(moving_video(10, 16, 16), check_stop=stop_after_three))
    assert writer.written == 3
