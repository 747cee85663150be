"""model.clips: the clip policy (full clips with an overlapping last clip, stretched short videos,
-1 padding for the authors' checkpoints) and stitching every frame from exactly one clip."""
import pytest
import torch

from coordtok.model.clips import ClipLayout, policy_for

T = 8


@pytest.mark.parametrize("total", [1, 3, 7, 8, 9, 15, 16, 17, 30])
@pytest.mark.parametrize("policy", ["stretch", "pad"])
def test_cut_then_stitch_gives_back_every_frame_once(total, policy):
    layout = ClipLayout.plan(total, T, policy)
    video = torch.arange(total)
    clips = layout.cut(video)
    assert clips.shape == (-(-total // T), T) and layout.total == total
    assert torch.equal(layout.stitch(clips), video)
    kept = [f for k in range(layout.clips) for f in range(*layout.keep(k))]
    assert kept == list(range(total))


def test_native_policy_makes_only_full_clips_the_last_ending_at_the_last_frame():
    layout = ClipLayout.plan(20, T, "stretch")
    assert layout.starts == (0, 8, 12) and layout.lengths == (8, 8, 8)
    assert layout.model_n_frames().tolist() == [8, 8, 8]
    clips = layout.cut(torch.arange(20))
    assert clips[-1].tolist() == list(range(12, 20))
    # Frames 12-15 are in clips 1 and 2; they come from the last clip only.
    assert layout.keep(1) == (8, 12) and layout.keep(2) == (12, 20)


def test_a_short_video_is_stretched_and_decoded_from_the_centre_of_each_run():
    layout = ClipLayout.plan(3, T, "stretch")
    clip = layout.cut(torch.tensor([10, 20, 30]))[0]
    assert clip.tolist() == [10, 10, 10, 20, 20, 20, 30, 30]
    assert layout.clip_frame(0, torch.arange(3)).tolist() == [1, 4, 6]
    assert layout.model_n_frames().tolist() == [8]


def test_pad_policy_keeps_the_public_implementations_clips():
    layout = ClipLayout.plan(20, T, "pad")
    assert layout.starts == (0, 8, 16) and layout.lengths == (8, 8, 4)
    assert layout.model_n_frames().tolist() == [8, 8, 4]
    clips = layout.cut(torch.arange(1, 21))
    assert clips[2].tolist() == [17, 18, 19, 20, 0, 0, 0, 0]
    assert policy_for(True) == "pad" and policy_for(False) == "stretch"


def test_pieces_of_a_range_name_the_clip_frames_to_decode():
    layout = ClipLayout.plan(20, T, "stretch")
    pieces = layout.pieces(6, 14)
    assert [(k, frames) for k, frames, _ in pieces] == [(0, (6, 8)), (1, (0, 4)), (2, (0, 2))]
    assert all(torch.equal(index, torch.arange(len(index))) for _, _, index in pieces)
    (k, frames, index), = ClipLayout.plan(3, T, "stretch").pieces(1, 3)
    assert (k, frames, index.tolist()) == (0, (4, 7), [0, 2])
    with pytest.raises(ValueError, match="within the 20 frames"):
        layout.pieces(5, 21)


def test_a_partial_middle_clip_is_placed_by_the_running_sum():
    layout = ClipLayout((0, 64), (64, 128), 128, "pad")
    assert layout.total == 192
    assert [(k, frames) for k, frames, _ in layout.pieces(0, 192)] == [(0, (0, 64)), (1, (0, 128))]


@pytest.mark.parametrize("starts, lengths, policy, message", [
    ((0, 8), (8,), "stretch", "one start and one length"),
    ((1,), (8,), "stretch", "start at frame 0"),
    ((0,), (9,), "stretch", r"lengths must lie in \[1, 8\]"),
    ((0, 9), (8, 8), "stretch", "no gap"),
    ((0, 0), (8, 8), "stretch", "in order"),
    ((0, 4), (4, 8), "stretch", "only a single-clip video"),
    ((0,), (8,), "mirror", "clip policy"),
])
def test_impossible_layouts_are_refused(starts, lengths, policy, message):
    with pytest.raises(ValueError, match=message):
        ClipLayout(starts, lengths, T, policy)
