"""load_official + our model reproduce the public implementation's outputs (fp32, CPU)."""
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coordtok.model import CoordTok, Triplane, load_official
from coordtok.trainer.losses import patch_mse

HERE = Path(__file__).resolve().parent.parent / "data" / "official"


def parity_folders() -> list[Path]:
    roots = [HERE] + ([Path(os.environ["COORDTOK_PARITY_DIR"])] if "COORDTOK_PARITY_DIR" in os.environ else [])
    return sorted(p.parent for root in roots for p in root.glob("*/vectors.safetensors"))


@pytest.fixture(scope="module", params=parity_folders(), ids=lambda p: p.name)
def case(request):
    folder = request.param
    model = load_official(folder / "checkpoint.pth", folder / "config.json", device="cpu")
    return model, load_file(str(folder / "vectors.safetensors"))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, name
    err = (actual - expected).abs().max().item()
    assert err < 1e-4, f"{name}: max abs error {err:.2e}"


def test_parity_folders_exist():
    assert len(parity_folders()) >= 2


@torch.no_grad()
def test_triplanes_match(case):
    model, v = case
    triplane = model.encode(v["video"], v["n_frames"])
    for name, plane in zip(("z_xy", "z_yt", "z_xt"), triplane.planes()):
        assert_close(plane, v[name], name)


@torch.no_grad()
def test_patches_and_loss_match(case):
    model, v = case
    triplane = model.encode(v["video"], v["n_frames"])
    patches = model.decode(triplane, v["coords"])
    assert_close(patches, v["patches"], "patches")
    loss = patch_mse(patches, v["targets"])
    assert torch.allclose(loss, v["loss"].reshape(()), rtol=1e-5, atol=0), (loss, v["loss"])


@torch.no_grad()
def test_whole_video_decodes_match(case):
    model, v = case
    triplane = model.encode(v["video"], v["n_frames"])[0]
    frames = model.config.frames
    assert_close(model.decode_video(triplane, slice_frames=frames)[0], v["video_decoded_1slice"], "1 slice")
    assert_close(model.decode_video(triplane, slice_frames=frames // 4)[0], v["video_decoded_4slices"], "4 slices")


@torch.no_grad()
def test_given_triplane_decodes_to_reference_patches(case):
    model, v = case
    patches = model.decode(Triplane(v["z_xy"], v["z_yt"], v["z_xt"]), v["coords"])
    assert_close(patches, v["patches"], "patches from the reference triplane")


@torch.no_grad()
def test_reference_padding_mask_differs_from_excluding_mask(case):
    """Sample 1 is padded: an excluding mask changes its triplane, so the reference's additive
    mask is what load_official must (and does) reproduce."""
    model, v = case
    assert v["n_frames"][1].item() < model.config.frames
    excluding = CoordTok(replace(model.config, reference_compat=False)).eval()
    excluding.load_state_dict(model.state_dict())
    ref, excl = model.encode(v["video"], v["n_frames"]), excluding.encode(v["video"], v["n_frames"])
    assert (excl.xy[1] - ref.xy[1]).abs().max() > 1e-3
    assert (excl.xy[0] - ref.xy[0]).abs().max() < 1e-5
