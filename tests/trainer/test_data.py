"""trainer.data: listing, clip shapes and padding, skipping unreadable files, reproducibility,
caching and the loader."""
import logging
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from coordtok.formats.video_write import write_video
from coordtok.trainer.data import Augment, VideoClips, list_videos

T, H, W = 8, 32, 32


def moving_video(frames: int, height: int, width: int, offset: int = 0) -> np.ndarray:
    """uint8 [T, H, W, 3]: grey level 4 * (offset + i) in frame i plus a gradient, so every frame
    of every file differs."""
    y = np.linspace(0, 30, height)[:, None, None]
    x = np.linspace(0, 30, width)[None, :, None]
    base = (y + x * np.array([1.0, 0.3, 0.6])).astype(np.uint8)
    return np.stack([base + np.uint8(4 * (offset + i)) for i in range(frames)])


def write_ffv1(path, frames: np.ndarray, fps: int = 30) -> None:
    """FFV1 in Matroska: lossless and accepts odd sizes."""
    with av.open(path, "w") as container:
        stream = container.add_stream("ffv1", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """UCF-101-like class folders: 40- and 30-frame 64x48 MP4s, a 5-frame one, a 97x61 MKV, plus
    a text file, a hidden resource fork and a broken .avi."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "ClassA").mkdir()
    (root / "ClassB" / "nested").mkdir(parents=True)
    write_video(moving_video(40, 48, 64), root / "ClassA" / "long.mp4", fps=30)
    write_video(moving_video(30, 48, 64, offset=10), root / "ClassA" / "mid.MP4", fps=30)
    write_video(moving_video(5, 48, 64, offset=20), root / "ClassB" / "short.mp4", fps=30)
    write_ffv1(root / "ClassB" / "nested" / "odd.mkv", moving_video(20, 61, 97, offset=5))
    (root / "ClassB" / "notes.txt").write_text("not a video")
    (root / "ClassA" / "._long.mp4").write_bytes(b"\x00\x05\x16\x07")
    (root / "ClassB" / "broken.avi").write_text("RIFF but not really a video")
    return root


def test_list_videos_is_recursive_sorted_and_filtered(corpus):
    names = [p.relative_to(corpus).as_posix() for p in list_videos(corpus)]
    assert names == ["ClassA/long.mp4", "ClassA/mid.MP4", "ClassB/broken.avi", "ClassB/nested/odd.mkv",
                     "ClassB/short.mp4"]
    with pytest.raises(FileNotFoundError):
        list_videos(corpus / "missing")


def test_clip_shape_and_value_range(corpus):
    dataset = VideoClips([corpus / "ClassA" / "long.mp4", corpus / "ClassB" / "nested" / "odd.mkv"], T, H, W)
    for index in range(len(dataset)):
        video, n_frames = dataset[index]
        assert video.shape == (T, H, W, 3) and video.dtype == torch.float32
        assert n_frames == T and video.min() >= -1 and video.max() <= 1
        assert video.std() > 0


def test_short_video_is_padded_with_minus_one_under_the_pad_policy(corpus):
    video, n_frames = VideoClips([corpus / "ClassB" / "short.mp4"], T, H, W, policy="pad")[0]
    assert n_frames == 5
    assert torch.all(video[5:] == -1)
    assert torch.all(video[:5].flatten(1).max(dim=1).values > -1)


def test_short_video_is_stretched_to_a_full_clip_by_default(corpus):
    video, n_frames = VideoClips([corpus / "ClassB" / "short.mp4"], T, H, W)[0]
    padded, _ = VideoClips([corpus / "ClassB" / "short.mp4"], T, H, W, policy="pad")[0]
    assert n_frames == T
    # Clip frame j holds source frame floor(j * 5 / 8): 0 0 1 1 2 3 3 4.
    for j, source in enumerate([0, 0, 1, 1, 2, 3, 3, 4]):
        torch.testing.assert_close(video[j], padded[source], rtol=0, atol=0)


def test_augmented_views_vary_and_stay_in_range(corpus):
    files = [corpus / "ClassA" / "long.mp4", corpus / "ClassB" / "nested" / "odd.mkv"]
    plain = VideoClips(files, T, H, W, seed=2)
    augmented = VideoClips(files, T, H, W, seed=2, cache=True, clips_per_video=8,
                           augment=Augment(min_scale=0.5, strides=(1, 2, 3), short=0.5, short_min=2))
    items = [augmented[i] for i in range(len(augmented))]
    assert all(v.shape == (T, H, W, 3) and n == T and -1 <= v.min() and v.max() <= 1 for v, n in items)
    assert not torch.equal(items[0][0], plain[0][0])
    # Different draws give different views of the same file; the same draw gives the same view.
    assert len({round(float(v.mean()), 4) for v, _ in items[::2]}) > 1
    torch.testing.assert_close(augmented[3][0], items[3][0], rtol=0, atol=0)


def test_augment_flips_and_reverses(corpus):
    path = [corpus / "ClassA" / "long.mp4"]
    base = dict(min_scale=1.0, zoom=1.0, strides=(1,), short=0.0)
    plain = VideoClips(path, T, H, W, augment=Augment(flip=0.0, reverse=0.0, **base))[0][0]
    flipped = VideoClips(path, T, H, W, augment=Augment(flip=1.0, reverse=0.0, **base))[0][0]
    reversed_ = VideoClips(path, T, H, W, augment=Augment(flip=0.0, reverse=1.0, **base))[0][0]
    torch.testing.assert_close(flipped, plain.flip(2), rtol=0, atol=0)
    torch.testing.assert_close(reversed_, plain.flip(0), rtol=0, atol=0)


def test_augment_stride_skips_frames(corpus):
    path = [corpus / "ClassA" / "long.mp4"]  # 40 frames, each brighter than the one before
    base = dict(min_scale=1.0, zoom=1.0, flip=0.0, reverse=0.0, short=0.0)
    one = VideoClips(path, T, H, W, augment=Augment(strides=(1,), **base))[0][0].mean(dim=(1, 2, 3))
    three = VideoClips(path, T, H, W, augment=Augment(strides=(3,), **base))[0][0].mean(dim=(1, 2, 3))
    assert (three[-1] - three[0]) > 2 * (one[-1] - one[0])


def test_fps_resampling_changes_the_time_grid(corpus):
    path = corpus / "ClassA" / "long.mp4"  # 40 frames at 30 fps: 20 at 15 fps, 4 at 3 fps
    assert VideoClips([path], 32, H, W, fps=15, policy="pad")[0][1] == 20
    sparse, n_frames = VideoClips([path], T, H, W, fps=3, policy="pad")[0]
    assert n_frames == 4
    means = sparse[:4].mean(dim=(1, 2, 3))
    assert torch.all(means[1:] > means[:-1])  # frames 0, 10, 20, 30: brighter and brighter


def test_unreadable_file_is_skipped_counted_and_warned_once(corpus, caplog):
    good = [corpus / "ClassA" / "long.mp4", corpus / "ClassA" / "mid.MP4"]
    broken = corpus / "ClassB" / "broken.avi"
    dataset = VideoClips([good[0], broken, good[1]], T, H, W, clips_per_video=2)
    with caplog.at_level(logging.WARNING, logger="coordtok.trainer.data"):
        items = [dataset[i] for i in range(len(dataset))] + [dataset[1], dataset[4]]
    assert dataset.skipped == 1
    warnings = [r.getMessage() for r in caplog.records if r.name == "coordtok.trainer.data"]
    assert len(warnings) == 1 and str(broken) in warnings[0]
    assert all(video.shape == (T, H, W, 3) and n == T for video, n in items)
    # Items of the broken file come from the next readable one (mid.MP4), the same each time.
    torch.testing.assert_close(items[1][0], items[6][0], rtol=0, atol=0)
    fresh = VideoClips([good[0], broken, good[1]], T, H, W, clips_per_video=2)
    torch.testing.assert_close(fresh[1][0], items[1][0], rtol=0, atol=0)


def test_all_files_unreadable_is_a_clear_error(corpus):
    dataset = VideoClips([corpus / "ClassB" / "broken.avi", corpus / "ClassB" / "notes.txt"], T, H, W)
    with pytest.raises(RuntimeError, match="none of the 2 video files"):
        dataset[0]
    assert dataset.skipped == 2


def test_clips_are_reproducible_per_seed_epoch_and_index(corpus):
    files = [corpus / "ClassA" / "long.mp4", corpus / "ClassA" / "mid.MP4"]
    first, second = VideoClips(files, T, H, W, seed=3), VideoClips(files, T, H, W, seed=3)
    starts = set()
    for epoch in range(4):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        for index in range(len(first)):
            a, b = first[index][0], second[index][0]
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            starts.add((index, round(a.mean().item(), 3)))
    assert len(starts) > len(first)  # the random start changes with the epoch


def test_cache_gives_the_same_clips(corpus):
    files = list_videos(corpus)
    cached = VideoClips(files, T, H, W, cache=True, clips_per_video=2, seed=1)
    streamed = VideoClips(files, T, H, W, cache=False, clips_per_video=2, seed=1)
    for epoch in range(2):
        cached.set_epoch(epoch)
        streamed.set_epoch(epoch)
        for index in range(len(cached)):
            (a, n_a), (b, n_b) = cached[index], streamed[index]
            assert n_a == n_b
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert cached.skipped == streamed.skipped == 1


def fingerprints(batches) -> list[float]:
    return sorted(round(v.double().sum().item(), 2) for videos, _ in batches for v in videos)


def test_persistent_workers_follow_set_epoch(corpus):
    files = [corpus / "ClassA" / "long.mp4", corpus / "ClassA" / "mid.MP4"]
    dataset = VideoClips(files, T, H, W, clips_per_video=2)
    loader = DataLoader(dataset, batch_size=2, num_workers=1, persistent_workers=True)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 2
        videos, n_frames = batches[0]
        assert videos.shape == (2, T, H, W, 3) and n_frames.tolist() == [T, T]
        assert fingerprints(batches) == fingerprints([(dataset[i][0][None], None) for i in range(len(dataset))])

