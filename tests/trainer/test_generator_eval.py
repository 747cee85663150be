"""trainer.generator_eval: the measurements tell a mosaic from video, and a copy from a sample."""
import torch

from coordtok.trainer.generator_eval import boundary_ratio, frechet_distance, nearest_distances, temporal_change


def smooth_video(frames: int = 4, size: int = 32) -> torch.Tensor:
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(size), torch.arange(size), indexing="ij")
    return torch.sin((x + y + 3 * t) / 5.0)[None, ..., None].expand(-1, -1, -1, -1, 3)  # [1, T, H, W, 3]


def test_boundary_ratio_is_one_for_smooth_video_and_large_for_a_mosaic():
    assert abs(boundary_ratio(smooth_video(), patch=8) - 1) < 0.1
    torch.manual_seed(0)
    cells = torch.rand(1, 4, 4, 4, 3) * 2 - 1  # one random colour per 8x8 patch, slight texture inside
    mosaic = cells.repeat_interleave(8, 2).repeat_interleave(8, 3) + 0.01 * smooth_video()
    assert boundary_ratio(mosaic, patch=8) > 10


def test_temporal_change_is_zero_for_a_still_video():
    still = smooth_video()[:, :1].expand(-1, 4, -1, -1, -1)
    assert temporal_change(still) == 0 and temporal_change(smooth_video()) > 0.05


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    torch.manual_seed(0)
    a = torch.randn(500, 6, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-6
    shifted = frechet_distance(a, a + 2.0)
    assert abs(shifted - 4 * 6) < 1e-6  # |mu_a - mu_b|^2 with equal covariances
    assert frechet_distance(a, 3 * a) > 1


def test_nearest_distances_find_copies():
    torch.manual_seed(0)
    train = torch.randn(20, 5)
    copies = train[:4] + 1e-3
    assert (nearest_distances(copies, train) < 0.01).all()
    assert (nearest_distances(train, train, exclude_self=True) > 0.1).all()
