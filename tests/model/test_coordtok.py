"""CoordTok network behaviour: shapes, presets, padding, slicing policy, layout."""
import os
from dataclasses import replace

import pytest
import torch

from coordtok.model import CoordTok, CoordTokConfig, PRESETS, Triplane, load_model, preset, save_model
from coordtok.model.triplane import frame_coords, patch_counts, patch_indices, patches_to_video, video_to_patches

SMALL = CoordTokConfig(
    frames=16, height=32, width=48,
    enc_dim=32, enc_heads=2, enc_patch_t=4, enc_patch_xy=8, enc_vit_layers=1, enc_cross_layers=1,
    latent_res_xy=8, latent_res_t=16, latent_channels=4, latent_patch_xy=4, latent_patch_t=4,
    dec_dim=32, dec_heads=2, dec_layers=2, dec_patch_t=1, dec_patch_xy=8, decode_slice_frames=4,
)


def random_video(config: CoordTokConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, config.frames, config.height, config.width, 3, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def small_model() -> CoordTok:
    torch.manual_seed(0)
    return CoordTok(SMALL).eval()


def test_paper_presets_give_1280_tokens():
    for name in ("coordtok-l", "coordtok-b", "coordtok-s", "coordtok-tiny"):
        assert preset(name).tokens == 1280, name


def test_coordtok_l_has_the_papers_shape():
    with torch.device("meta"):
        model = CoordTok(preset("coordtok-l"))
    c = model.config
    assert (c.frames, c.height, c.width) == (128, 128, 128)
    assert len(model.encoder.video_blocks) == 8 and len(model.encoder.cross_blocks) == 24
    assert len(model.decoder.blocks) == 24 and model.decoder.embed.out_features == 1024
    assert model.encoder.video_patch_embed.kernel_size == (8, 16, 16)
    assert model.decoder.to_pixels.out_features == 1 * 8 * 8 * 3


def test_every_preset_encodes_to_its_triplane_shape():
    for name in PRESETS:
        c = preset(name)
        with torch.device("meta"):
            model = CoordTok(c)
            triplane = model.encoder(torch.empty(1, c.frames, c.height, c.width, 3), torch.full((1,), c.frames))
        assert triplane.xy.shape == (1, c.latent_res_xy, c.latent_res_xy, c.latent_channels), name
        assert triplane.yt.shape == triplane.xt.shape == (1, c.latent_res_t, c.latent_res_xy, c.latent_channels)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="coordtok-tiny"):
        preset("coordtok-xxl")


def test_config_rejects_indivisible_shapes():
    with pytest.raises(ValueError, match="height % enc_patch_xy"):
        replace(SMALL, height=36)


def test_config_json_round_trip():
    assert CoordTokConfig.from_json(SMALL.to_json()) == SMALL


@torch.no_grad()
def test_non_square_frames_and_latent_patch_grids(small_model):
    # SMALL has 32x48 frames and a 4x2 query-token grid on the time planes.
    assert small_model.encoder.planes["yt"].grid == (4, 2)
    triplane = small_model.encode(random_video(SMALL))
    assert triplane.xy.shape == (2, 8, 8, 4) and triplane.yt.shape == (2, 16, 8, 4)
    video = small_model.decode_video(triplane)
    assert video.shape == (2, 16, 32, 48, 3)


@torch.no_grad()
def test_frame_range_decode_equals_those_frames_of_a_full_decode(small_model):
    triplane = small_model.encode(random_video(SMALL))
    full = small_model.decode_video(triplane)
    for start, stop in [(0, 4), (4, 12), (3, 9), (15, 16), (0, 16)]:
        part = small_model.decode_video(triplane, frames=(start, stop))
        torch.testing.assert_close(part, full[:, start:stop], rtol=0, atol=1e-6)


@torch.no_grad()
def test_frame_range_decode_runs_only_overlapping_slices(small_model):
    calls = []
    handle = small_model.decoder.register_forward_hook(lambda m, args, out: calls.append(args[1].shape[1]))
    try:
        small_model.decode_video(small_model.encode(random_video(SMALL, batch=1)), frames=(5, 7))
    finally:
        handle.remove()
    assert calls == [4 * 4 * 6]  # one slice of 4 frames, 4x6 patches each


@torch.no_grad()
def test_slice_length_changes_the_output(small_model):
    triplane = small_model.encode(random_video(SMALL, batch=1))
    assert not torch.allclose(small_model.decode_video(triplane, slice_frames=4), small_model.decode_video(triplane, slice_frames=16))


@torch.no_grad()
def test_padded_frames_are_ignored_by_a_native_model(small_model):
    video = random_video(SMALL, batch=1)
    n = torch.tensor([6])
    garbage = video.clone()
    garbage[:, 8:] = torch.rand_like(garbage[:, 8:])
    a = small_model.encode(video, n)
    b = small_model.encode(garbage, n)  # frames from 8 on lie in fully padded temporal tokens
    c = small_model.encode(video[:, :6])  # short clip, auto-padded with -1
    for x, y in [(a, b), (a, c)]:
        torch.testing.assert_close(x.xy, y.xy, rtol=0, atol=1e-5)
    assert not torch.allclose(a.xy, small_model.encode(video).xy, atol=1e-4)


@torch.no_grad()
def test_batched_encode_equals_one_at_a_time(small_model):
    video = random_video(SMALL, batch=3)
    n = torch.tensor([16, 9, 4])
    batched = small_model.encode(video, n)
    for i in range(3):
        single = small_model.encode(video[i : i + 1], n[i : i + 1])
        torch.testing.assert_close(batched[i].xy, single.xy, rtol=1e-5, atol=1e-5)


def test_encode_and_decode_reject_bad_input(small_model):
    with pytest.raises(ValueError, match="video must be"):
        small_model.encode(torch.zeros(1, 16, 32, 32, 3))
    with pytest.raises(ValueError, match="n_frames"):
        small_model.encode(random_video(SMALL, batch=1), torch.tensor([0]))
    triplane = small_model.encode(random_video(SMALL, batch=1))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        small_model.decode(triplane, torch.full((1, 2, 3), 1.5))
    with pytest.raises(ValueError, match="frames must"):
        small_model.decode_video(triplane, frames=(4, 4))


def test_training_step_gives_gradients_to_every_parameter():
    torch.manual_seed(0)
    model = CoordTok(SMALL)
    video = random_video(SMALL)
    coords = frame_coords(SMALL, 0, 4).expand(2, -1, -1)
    pred = model(video, torch.tensor([16, 12]), coords)
    pred.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_patch_layout_round_trips_and_matches_coordinate_order():
    video = random_video(SMALL, batch=1)
    patches = video_to_patches(video, SMALL)
    torch.testing.assert_close(patches_to_video(patches, SMALL), video, rtol=0, atol=0)
    coords = frame_coords(SMALL, 0, SMALL.frames)
    t, x, y = patch_indices(coords, SMALL)[37].tolist()
    p = SMALL.dec_patch_xy
    block = video[0, t, x * p : (x + 1) * p, y * p : (y + 1) * p]
    torch.testing.assert_close(patches[0, 37].reshape(p, p, 3), block, rtol=0, atol=0)


def test_patch_indices_round_but_reference_truncates():
    config = replace(SMALL, frames=23, enc_patch_t=1, decode_slice_frames=1)  # 23 patches along t
    coords = frame_coords(config, 0, 23)
    expected = torch.arange(23).repeat_interleave(patch_counts(config)[1] * patch_counts(config)[2])
    assert torch.equal(patch_indices(coords, config)[:, 0], expected)
    truncated = patch_indices(coords, replace(config, reference_compat=True))[:, 0]
    assert (truncated != expected).any() and ((expected - truncated) <= 1).all()


def test_triplane_batch_helpers():
    planes = [torch.randn(3, 8, 8, 4), torch.randn(3, 16, 8, 4), torch.randn(3, 16, 8, 4)]
    tri = Triplane(*planes)
    assert tri[1].batch_size == 1 and torch.equal(tri[-1].xy, planes[0][2:])
    assert Triplane.cat([tri[0], tri[2]]).batch_size == 2
    with pytest.raises(ValueError, match="one batch size"):
        Triplane(planes[0], planes[1][:2], planes[2])


def test_uint8_round_trip_and_triplane_split():
    from coordtok.model.triplane import from_uint8, to_uint8

    pixels = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    assert torch.equal(to_uint8(from_uint8(pixels)), pixels) and from_uint8(pixels).aminmax() == (-1, 1)
    tri = Triplane(torch.randn(5, 4, 4, 2), torch.randn(5, 8, 4, 2), torch.randn(5, 8, 4, 2))
    parts = tri.split([2, 3])
    assert [p.batch_size for p in parts] == [2, 3] and torch.equal(parts[1].xt, tri.xt[2:])


def test_saved_weights_are_readable_as_any_new_file_is(tmp_path):
    """safetensors writes its files 0600; an exported model must be readable by a server running as
    another user (a container's), so it gets the mode the umask gives new files."""
    old = os.umask(0o022)
    try:
        save_model(CoordTok(SMALL), tmp_path / "m.safetensors")
        os.umask(0o077)
        save_model(CoordTok(SMALL), tmp_path / "private.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.safetensors").stat().st_mode & 0o777 == 0o600
    assert load_model(tmp_path / "m.safetensors", device="cpu").config == SMALL
