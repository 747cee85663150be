"""LPIPS-VGG16: loading both weight formats, distance properties, gradients, errors."""
import logging

import pytest
import torch
from safetensors.torch import save_file

from coordtok.trainer.lpips import LPIPS, STAGE_CHANNELS, load_lpips, lpips_video


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    """Random LPIPS weights under our names (backbone as built, random non-negative linears)."""
    torch.manual_seed(0)
    state = LPIPS().state_dict()
    for stage, channels in enumerate(STAGE_CHANNELS):
        state[f"linear.{stage}.weight"] = torch.rand(1, channels, 1, 1)
    return state


@pytest.fixture(scope="module")
def model(weights) -> LPIPS:
    m = LPIPS()
    m.load_state_dict(weights)
    return m


@pytest.fixture(scope="module")
def pth_files(weights, tmp_path_factory) -> tuple:
    """The two files people have: torchvision's VGG16 state dict and the lpips package's vgg.pth."""
    folder = tmp_path_factory.mktemp("lpips_pth")
    backbone = {k: v for k, v in weights.items() if k.startswith("features.")}
    backbone["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision's head, ignored
    linear = {f"lin{i}.model.1.weight": weights[f"linear.{i}.weight"] for i in range(len(STAGE_CHANNELS))}
    torch.save(backbone, folder / "vgg16-397923af.pth")
    torch.save(linear, folder / "vgg.pth")
    return folder / "vgg16-397923af.pth", folder / "vgg.pth"


def images(seed: int, n: int = 2, size: int = 16) -> torch.Tensor:
    """[n, 3, size, size] in [-1, 1]; 16 is the smallest size VGG16's four pools allow."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def assert_same_weights(loaded: LPIPS, weights: dict[str, torch.Tensor]) -> None:
    state = loaded.state_dict()
    assert sorted(state) == sorted(weights)
    for key, tensor in weights.items():
        assert torch.equal(state[key], tensor), key


def test_safetensors_file_round_trips_every_key(model, weights, tmp_path):
    model.save(tmp_path / "lpips.safetensors")
    assert_same_weights(LPIPS.from_file(tmp_path / "lpips.safetensors"), weights)


def test_torchvision_and_lpips_package_files_map_every_key(pth_files, weights):
    assert_same_weights(LPIPS.from_files(*pth_files), weights)


def test_the_backbone_has_vgg16_layout():
    convs = [k for k in LPIPS().state_dict() if k.startswith("features.") and k.endswith(".weight")]
    assert [int(k.split(".")[1]) for k in convs] == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


def test_distance_to_itself_is_zero(model):
    x = images(1)
    assert torch.equal(model(x, x), torch.zeros(2))


def test_distance_is_positive_and_symmetric_for_different_images(model):
    x, y = images(1), images(2)
    d = model(x, y)
    assert d.shape == (2,) and bool((d > 0).all())
    torch.testing.assert_close(d, model(y, x))


def test_distance_is_per_image(model):
    x, y = images(1), images(2)
    batched = model(x, y)
    single = torch.cat([model(x[i : i + 1], y[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(batched, single)


def test_gradient_reaches_the_input_but_not_the_weights(model):
    x = images(1).requires_grad_(True)
    model(x, images(2)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in model.parameters())


def test_gradient_is_finite_at_zero_distance(model):
    x = images(1).requires_grad_(True)
    model(x, x.detach()).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_lpips_video_averages_frames(model):
    a, b = images(1, n=4).permute(0, 2, 3, 1), images(2, n=4).permute(0, 2, 3, 1)  # [4, H, W, 3]
    video_a, video_b = a.reshape(2, 2, 16, 16, 3), b.reshape(2, 2, 16, 16, 3)
    per_frame = model(a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2)).view(2, 2)
    torch.testing.assert_close(lpips_video(model, video_a, video_b, frame_batch=3), per_frame.mean(dim=1))


def test_swapped_files_are_named(pth_files):
    with pytest.raises(ValueError, match="swapped"):
        LPIPS.from_files(pth_files[1], pth_files[0])


def test_wrong_linear_file_is_a_shape_error(pth_files, tmp_path):
    # The lpips package's AlexNet weights have the same key names and other channel counts.
    alex = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(alex, tmp_path / "alex.pth")
    with pytest.raises(ValueError, match="shape mismatch"):
        LPIPS.from_files(pth_files[0], tmp_path / "alex.pth")


def test_incomplete_safetensors_lists_missing_keys(weights, tmp_path):
    partial = {k: v for k, v in weights.items() if not k.startswith("linear.4")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['linear.4.weight'\]"):
        LPIPS.from_file(tmp_path / "partial.safetensors")


def test_negative_linear_weights_are_rejected(weights, tmp_path):
    save_file({**weights, "linear.0.weight": -weights["linear.0.weight"]}, str(tmp_path / "neg.safetensors"))
    with pytest.raises(ValueError, match="non-negative"):
        LPIPS.from_file(tmp_path / "neg.safetensors")


def test_from_file_points_pth_users_to_from_files(pth_files):
    with pytest.raises(ValueError, match="from_files"):
        LPIPS.from_file(pth_files[0])


def test_load_lpips_without_weights_warns(caplog):
    with caplog.at_level(logging.WARNING):
        assert load_lpips(None) is None
    assert "LPIPS weights not given; the loss is MSE only" in caplog.text


def test_load_lpips_accepts_a_file_or_a_pair(model, pth_files, weights, tmp_path):
    model.save(tmp_path / "lpips.safetensors")
    assert_same_weights(load_lpips(tmp_path / "lpips.safetensors"), weights)
    assert_same_weights(load_lpips(pth_files), weights)
