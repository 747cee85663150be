"""Training losses."""
import torch


def patch_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-clip mean squared error over [B, N, V] patches, summed over the batch (the paper's loss)."""
    return ((pred - target) ** 2).mean(dim=(1, 2)).sum()
