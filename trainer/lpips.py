"""LPIPS perceptual distance (Zhang et al., CVPR 2018, "v0.1") with the VGG16 backbone.

    d(x, y) = sum over stages l of  mean over (h, w) of  sum over c of  w_l[c] * (f_l(x) - f_l(y))[c, h, w]^2

where f_l is the stage-l ReLU output of VGG16 (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)
unit-normalised over channels, of the input after the paper's scaling layer, and w_l >= 0 are the
learned per-channel weights (a 1x1 convolution without bias).

Weights cannot be downloaded here, so the user supplies them:
- one `.safetensors` file under this module's own names (`features.N.weight/bias` of the VGG16
  conv stack, `linear.L.weight [1, C, 1, 1]`), as written by `LPIPS.save`; or
- the two files people have: torchvision's `vgg16-397923af.pth` (`features.N.weight/bias`, its
  `classifier.*` is ignored) and the `lpips` package's `weights/v0.1/vgg.pth`
  (`linL.model.1.weight`), via `LPIPS.from_files(backbone, linear)`.
`.pth` files are read with `torch.load(weights_only=True)`: nothing is unpickled beyond tensors.

The module is frozen (no parameter requires grad) but differentiable in its inputs, so it
serves as a training loss.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from coordtok.model.checkpoint import load_state_checked

log = logging.getLogger(__name__)

# VGG16 `features` layout: output channels of each 3x3 conv, "M" a 2x2 max-pool. The last pool
# (index 30) is not needed: LPIPS stops at relu5_3.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Stage l is features[_STAGE_ENDS[l-1]:_STAGE_ENDS[l]] and ends on relu1_2 ... relu5_3.
_STAGE_ENDS = (0, 4, 9, 16, 23, 30)
STAGE_CHANNELS = (64, 128, 256, 512, 512)
# The LPIPS v0.1 scaling layer: (x - shift) / scale per RGB channel, for inputs in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# As in the paper's code: x / (||x||_2 + eps) over channels.
_NORM_EPS = 1e-10
_LPIPS_LINEAR_KEY = re.compile(r"^lin(\d)\.model\.1\.weight$")


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG16:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU()]
            channels = item
    return nn.Sequential(*layers)


def _unit_normalise(features: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> the same, each spatial position divided by its L2 norm over channels."""
    features = features.float()
    return features / (torch.linalg.vector_norm(features, dim=1, keepdim=True) + _NORM_EPS)


class LPIPS(nn.Module):
    """LPIPS-VGG16: `forward(x, y)` with images [N, 3, H, W] in [-1, 1] -> distances [N].

    A freshly constructed module has untrained weights; load real ones with `from_file` or
    `from_files`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = _vgg16_features()
        self.linear = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in STAGE_CHANNELS)
        for layer in self.linear:
            nn.init.constant_(layer.weight, 1.0 / layer.in_channels)
        self.requires_grad_(False)
        self.eval()

    def stages(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[N, 3, H, W] in [-1, 1] -> the five stage outputs [N, C_l, H / 2^(l-1), W / 2^(l-1)]."""
        x = (images - self.shift.to(images.dtype)) / self.scale.to(images.dtype)
        outputs = []
        for start, stop in zip(_STAGE_ENDS, _STAGE_ENDS[1:]):
            x = self.features[start:stop](x)
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y [N, 3, H, W] in [-1, 1] -> LPIPS distance [N] (float32)."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS takes two [N, 3, H, W] batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        n = x.shape[0]
        distance = x.new_zeros(n, dtype=torch.float32)
        for stage, linear in zip(self.stages(torch.cat([x, y])), self.linear):
            diff = (_unit_normalise(stage[:n]) - _unit_normalise(stage[n:])) ** 2  # [N, C, h, w]
            distance = distance + linear(diff.to(linear.weight.dtype)).float().mean(dim=(1, 2, 3))
        return distance

    def save(self, path: str | Path) -> None:
        """Write the weights as one safetensors file under this module's names."""
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path))

    @classmethod
    def from_file(cls, path: str | Path) -> LPIPS:
        """Load one `.safetensors` file holding the backbone and linear weights (see `save`)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(
                f"{path}: LPIPS.from_file reads one .safetensors file; for torchvision's vgg16 .pth and the "
                "lpips package's vgg.pth use LPIPS.from_files(backbone, linear)"
            )
        model = cls()
        model._load(load_file(str(path)), source=str(path))
        return model

    @classmethod
    def from_files(cls, backbone_path: str | Path, linear_path: str | Path) -> LPIPS:
        """Load torchvision's VGG16 weights (`vgg16-397923af.pth`) and the lpips package's
        linear weights (`lpips/weights/v0.1/vgg.pth`)."""
        backbone = _load_pth(backbone_path)
        linear = _load_pth(linear_path)
        if any(_LPIPS_LINEAR_KEY.match(k) for k in backbone) and any(k.startswith("features.") for k in linear):
            raise ValueError(f"{backbone_path} and {linear_path} look swapped: pass the VGG16 file first")
        state = {k: v for k, v in backbone.items() if k.startswith("features.")}
        if not state:
            raise ValueError(f"{backbone_path}: no 'features.N.weight' keys; is it torchvision's vgg16 state dict?")
        for key, tensor in linear.items():
            match = _LPIPS_LINEAR_KEY.match(key)
            if not match:
                raise ValueError(f"{linear_path}: unexpected key {key!r}; expected the lpips package's v0.1 vgg.pth")
            state[f"linear.{match.group(1)}.weight"] = tensor
        model = cls()
        model._load(state, source=f"{backbone_path} + {linear_path}")
        return model

    def _load(self, state: dict[str, torch.Tensor], source: str) -> None:
        negative = [k for k, v in state.items() if k.startswith("linear.") and bool((v < 0).any())]
        if negative:
            raise ValueError(f"{source}: LPIPS linear weights must be non-negative, {negative} are not")
        load_state_checked(self, state, source, "LPIPS-VGG16 weights")


def _load_pth(path: str | Path) -> dict[str, torch.Tensor]:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return state


def load_lpips(
    weights: str | Path | tuple[str | Path, str | Path] | None, device: str | torch.device = "cpu"
) -> LPIPS | None:
    """LPIPS from a `.safetensors` path or a (torchvision vgg16 .pth, lpips vgg.pth) pair, on
    `device`; None (with a warning) when no weights are given."""
    if weights is None:
        log.warning("LPIPS weights not given; the loss is MSE only")
        return None
    if isinstance(weights, (tuple, list)):
        model = LPIPS.from_files(*weights)
    else:
        model = LPIPS.from_file(weights)
    return model.to(device)


def lpips_video(model: LPIPS, a: torch.Tensor, b: torch.Tensor, frame_batch: int = 32) -> torch.Tensor:
    """Mean LPIPS over frames: videos a, b [B, T, H, W, 3] in [-1, 1] -> [B].

    Frames go through the network `frame_batch` at a time, which bounds the activation memory of
    an evaluation (under autograd the graph of every batch is kept, as a loss needs it).
    """
    if a.shape != b.shape or a.dim() != 5 or a.shape[-1] != 3:
        raise ValueError(f"lpips_video takes two [B, T, H, W, 3] videos of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    batch, frames = a.shape[:2]
    x = a.flatten(0, 1).permute(0, 3, 1, 2)  # [B*T, 3, H, W]
    y = b.flatten(0, 1).permute(0, 3, 1, 2)
    distances = torch.cat([model(x[i : i + frame_batch], y[i : i + frame_batch]) for i in range(0, len(x), frame_batch)])
    return distances.view(batch, frames).mean(dim=1)
