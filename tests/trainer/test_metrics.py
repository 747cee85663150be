"""Video metrics: PSNR, SSIM, and the trilinear baseline and its grid."""
import math

import pytest
import torch

from coordtok.trainer.metrics import baseline_grid, psnr, ssim, trilinear_baseline


def video(seed: int, shape=(2, 3, 24, 32)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, 3, generator=g) * 2 - 1


def test_psnr_of_a_known_offset():
    a = torch.zeros(1, 2, 8, 8, 3)  # 0.5 on [0, 1]
    b = torch.full_like(a, 0.5)  # 0.75 on [0, 1]: MSE 1/16
    torch.testing.assert_close(psnr(a, b), torch.tensor([10 * math.log10(16)]))


def test_psnr_clamps_to_the_display_range():
    a = -torch.ones(1, 1, 4, 4, 3)
    assert torch.isinf(psnr(a, a - 5)).all()


def test_psnr_is_per_clip():
    a, b = video(0), video(1)
    per_clip = torch.cat([psnr(a[i : i + 1], b[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(psnr(a, b), per_clip)


def test_ssim_of_identical_clips_is_one():
    a = video(0)
    torch.testing.assert_close(ssim(a, a), torch.ones(2))


def test_ssim_drops_with_noise_and_is_symmetric():
    a = video(0)
    g = torch.Generator().manual_seed(3)
    slightly = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    very = (a + 0.5 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    s_slight, s_very = ssim(a, slightly), ssim(a, very)
    assert bool((s_very < s_slight).all()) and bool((s_slight < 1).all())
    torch.testing.assert_close(ssim(very, a), s_very)


def test_ssim_of_constant_frames_is_the_luminance_term():
    # Constant frames have no variance, so SSIM = (2 mx my + C1) / (mx^2 + my^2 + C1).
    mx, my = 0.25, 0.75
    a = torch.full((1, 2, 16, 16, 3), mx * 2 - 1)
    b = torch.full((1, 2, 16, 16, 3), my * 2 - 1)
    c1 = 0.01**2
    expected = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    torch.testing.assert_close(ssim(a, b), torch.tensor([expected]))


def test_ssim_rejects_frames_smaller_than_the_window():
    with pytest.raises(ValueError, match="11x11"):
        ssim(video(0, (1, 1, 8, 32)), video(1, (1, 1, 8, 32)))


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        psnr(video(0), video(1, (2, 3, 24, 16)))


def test_baseline_grid_fits_the_budget_and_scales_every_axis_alike():
    for shape in [(128, 128, 128), (16, 128, 128), (128, 64, 96), (5, 128, 128), (2, 128, 128)]:
        grid = baseline_grid(shape, 10240)
        assert 3 * math.prod(grid) <= 10240
        # Each axis is round(n * f) for one scale f (axes clamped at 1 excepted).
        low = max((g - 0.5) / n for g, n in zip(grid, shape))
        high = min((g + 0.5) / n for g, n in zip(grid, shape) if g > 1)
        assert low <= high, (shape, grid)


def test_baseline_grid_of_the_papers_budget_is_a_cube():
    # 10,240 floats hold 3,413 RGB cells; the cube root is 15.06.
    assert baseline_grid((128, 128, 128), 10240) == (15, 15, 15)


def test_baseline_grid_grows_with_the_budget():
    grids = [baseline_grid((32, 48, 64), budget) for budget in (300, 3000, 30000)]
    cells = [math.prod(g) for g in grids]
    assert cells == sorted(cells) and len(set(cells)) == 3


def test_a_budget_beyond_the_clip_reconstructs_it_exactly():
    a = video(0, (1, 4, 6, 8))
    restored, grid = trilinear_baseline(a, budget_floats=3 * 4 * 6 * 8)
    assert grid == (4, 6, 8)
    torch.testing.assert_close(restored, a)


def test_trilinear_baseline_keeps_shape_and_constants():
    a = torch.full((2, 8, 16, 16, 3), 0.3)
    restored, grid = trilinear_baseline(a, budget_floats=3 * 64)
    assert restored.shape == a.shape and 3 * math.prod(grid) <= 3 * 64
    torch.testing.assert_close(restored, a)


def test_trilinear_baseline_improves_with_budget():
    a = video(0, (1, 8, 32, 32))
    low, _ = trilinear_baseline(a, 300)
    high, _ = trilinear_baseline(a, 6000)
    assert psnr(high, a) > psnr(low, a)
