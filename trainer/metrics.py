"""Video reconstruction quality: PSNR, SSIM, and the trilinear baseline at a float budget.

Videos are [B, T, H, W, 3] in [-1, 1] (the model's range); metrics clamp them to [-1, 1] and
map them to [0, 1] first, so they score what would be displayed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
_SSIM_C1 = 0.01**2  # (K1 * data_range)^2 with data_range 1
_SSIM_C2 = 0.03**2  # (K2 * data_range)^2


def _to_unit(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (clamped) -> [0, 1], float32."""
    return (video.float().clamp(-1, 1) + 1) / 2


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 5 or a.shape[-1] != 3:
        raise ValueError(f"expected two [B, T, H, W, 3] videos of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per clip: a, b [B, T, H, W, 3] in [-1, 1] -> [B].

    The MSE is taken over the whole clip on [0, 1] values (peak 1); identical clips give inf.
    """
    _check_pair(a, b)
    mse = ((_to_unit(a) - _to_unit(b)) ** 2).mean(dim=(1, 2, 3, 4))
    return 10 * torch.log10(1 / mse)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    """The normalised 1-D Gaussian [SSIM_WINDOW] (sigma SSIM_SIGMA)."""
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float32, device=device) - (SSIM_WINDOW - 1) / 2
    weights = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return weights / weights.sum()


def _filter(images: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter without padding: [N, K, H, W] -> [N, K, H - 10, W - 10]."""
    k = images.shape[1]
    rows = window.view(1, 1, -1, 1).expand(k, 1, -1, 1)
    cols = window.view(1, 1, 1, -1).expand(k, 1, 1, -1)
    return F.conv2d(F.conv2d(images, rows, groups=k), cols, groups=k)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per clip: a, b [B, T, H, W, 3] in [-1, 1] -> [B].

    Standard SSIM (Wang et al. 2004) on [0, 1] values: 11x11 Gaussian window with sigma 1.5,
    K1 = 0.01, K2 = 0.03, population (not sample) covariances; the SSIM map is averaged over the
    positions where the window fits inside the frame, then over channels and frames. This is what
    scikit-image's `structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=-1)` computes for one frame (it
    filters with reflected borders and then crops the 5-pixel margin, leaving the same positions).
    Frames must be at least 11x11.
    """
    _check_pair(a, b)
    batch, frames, height, width, _ = a.shape
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {height}x{width}")
    x = _to_unit(a).permute(0, 1, 4, 2, 3).reshape(-1, 1, height, width)  # [B*T*3, 1, H, W]
    y = _to_unit(b).permute(0, 1, 4, 2, 3).reshape(-1, 1, height, width)
    # Moments of values centred on each plane's mean: variances are differences of nearly equal
    # moments, and centring keeps float32 accurate (~1e-5 of scikit-image's float64) at a
    # quarter of float64's cost.
    x_mean, y_mean = x.mean(dim=(2, 3), keepdim=True), y.mean(dim=(2, 3), keepdim=True)
    x, y = x - x_mean, y - y_mean
    moments = _filter(torch.cat([x, y, x * x, y * y, x * y], dim=1), _gaussian_window(a.device))
    mu_x, mu_y, xx, yy, xy = moments.unbind(dim=1)  # each [B*T*3, H - 10, W - 10], centred
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    mu_x, mu_y = mu_x + x_mean[:, 0], mu_y + y_mean[:, 0]
    ssim_map = ((2 * mu_x * mu_y + _SSIM_C1) * (2 * cov + _SSIM_C2)) / (
        (mu_x**2 + mu_y**2 + _SSIM_C1) * (var_x + var_y + _SSIM_C2)
    )
    return ssim_map.reshape(batch, -1).mean(dim=1)


def baseline_grid(shape: tuple[int, int, int], budget_floats: int) -> tuple[int, int, int]:
    """The grid (t', h', w') of the trilinear baseline for a clip of `shape` (T, H, W): the RGB
    values on it must fit the budget, 3 * t' * h' * w' <= budget_floats.

    One scale f serves all three axes, so the clip's T:H:W proportions are kept as far as
    integers allow: each axis n becomes round(n * f), clamped to [1, n]. The grid only changes
    where some n * f crosses a half-integer, so the search visits those breakpoints and keeps the
    largest grid that fits (cells grow with f, so that is also the largest f). A budget beyond
    the clip's own size gives the clip's grid.
    """
    cells = budget_floats // 3
    if cells < 1:
        raise ValueError(f"a budget of {budget_floats} floats holds no RGB cell")
    breakpoints = sorted({(k + 0.5) / n for n in shape for k in range(n)})
    best = (1, 1, 1)
    for f in breakpoints:
        grid = tuple(min(n, max(1, math.floor(n * f + 0.5 + 1e-9))) for n in shape)
        if math.prod(grid) <= cells and math.prod(grid) > math.prod(best):
            best = grid
    return best


def trilinear_baseline(video: torch.Tensor, budget_floats: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Compress a clip to `budget_floats` numbers by resampling, the baseline for a tokenizer of
    that latent size: video [B, T, H, W, 3] -> (reconstruction [B, T, H, W, 3], grid (t', h', w')).

    Down: `F.interpolate(mode="area")` to `baseline_grid` (a box average over each cell's
    footprint, which stands in for an antialiased trilinear downsample: PyTorch has no antialias
    for 3-D). Up: `F.interpolate(mode="trilinear", align_corners=False)` back to (T, H, W).
    """
    if video.dim() != 5 or video.shape[-1] != 3:
        raise ValueError(f"video must be [B, T, H, W, 3], got {tuple(video.shape)}")
    size = tuple(video.shape[1:4])
    grid = baseline_grid(size, budget_floats)
    x = video.float().permute(0, 4, 1, 2, 3)  # [B, 3, T, H, W]
    small = F.interpolate(x, size=grid, mode="area")
    restored = F.interpolate(small, size=size, mode="trilinear", align_corners=False)
    return restored.permute(0, 2, 3, 4, 1).to(video.dtype), grid
