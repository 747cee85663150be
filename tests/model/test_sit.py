"""The SiT generator: presets and shapes, adaLN-Zero start, guidance, latent statistics, checkpoint
files and the sampling pipeline's per-video determinism."""
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from coordtok.model import (
    SIT_PRESETS, LatentStats, SiT, SiTConfig, Triplane, generate_triplanes, load_generator, preset, save_generator,
    sit_preset,
)
from coordtok.model.checkpoint import read_metadata
from coordtok.model.generate import flatten, unflatten
from coordtok.model.transport import SamplingCancelled

SMALL = SiTConfig(latent_res_xy=8, latent_res_t=8, latent_channels=4, dim=32, depth=2, heads=2)
DIT_SIZES = {"sit-s/2": (384, 12, 6), "sit-b/2": (768, 12, 12), "sit-l/2": (1024, 24, 16), "sit-xl/2": (1152, 28, 16)}


def random_triplane(config: SiTConfig, batch: int, seed: int = 0) -> Triplane:
    g = torch.Generator().manual_seed(seed)
    return Triplane(*(torch.randn(batch, *shape, generator=g) for shape in config.plane_shapes))


def random_triplane_meta(config: SiTConfig, batch: int) -> Triplane:
    return Triplane(*(torch.empty(batch, *shape) for shape in config.plane_shapes))


def trained_like(config: SiTConfig, seed: int = 0) -> SiT:
    """A SiT whose zero-initialised layers are random too, so that its output is not zero."""
    torch.manual_seed(seed)
    model = SiT(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def stats(channels: int) -> LatentStats:
    means = tuple(torch.linspace(-1, 1, channels) * (i + 1) for i in range(3))
    return LatentStats(means, tuple(torch.linspace(0.5, 2, channels) + i for i in range(3)))


def test_presets_have_the_dit_sizes_and_the_papers_320_tokens():
    for name, (dim, depth, heads) in DIT_SIZES.items():
        c = sit_preset(name)
        assert (c.dim, c.depth, c.heads, c.patch, c.mlp_ratio) == (dim, depth, heads, 2, 4.0), name
        assert c.tokens == 16 * 16 // 4 + 2 * 32 * 16 // 4 == 320
    assert set(SIT_PRESETS) == {*DIT_SIZES, "sit-tiny"}


@pytest.mark.parametrize("name", sorted(SIT_PRESETS))
def test_every_preset_maps_a_triplane_to_a_velocity_of_its_shape(name):
    c = sit_preset(name, preset("coordtok-l"))
    with torch.device("meta"):
        model = SiT(c)
        v = model(random_triplane_meta(c, batch=2), torch.rand(2))
    assert [tuple(p.shape) for p in v.planes()] == [(2, 16, 16, 8), (2, 32, 16, 8), (2, 32, 16, 8)]
    assert len(model.blocks) == c.depth and model.time_pos.shape == (16 * 8, c.dim)


def test_presets_fit_the_tokenizers_triplane():
    c = sit_preset("sit-b/2", replace(preset("coordtok-tiny"), latent_res_t=16, latent_channels=4))
    assert c.plane_shapes == ((16, 16, 4), (16, 16, 4), (16, 16, 4)) and c.dim == 768


def test_config_checks_and_json_round_trip():
    with pytest.raises(ValueError, match="latent_res_t % patch"):
        SiTConfig(latent_res_t=7)
    with pytest.raises(ValueError, match="dim % heads"):
        SiTConfig(dim=100, heads=16)
    with pytest.raises(ValueError, match="sit-tiny"):
        sit_preset("sit-h/2")
    assert SiTConfig.from_json(SMALL.to_json()) == SMALL
    with pytest.raises(ValueError, match="SiTConfig: unknown fields"):
        SiTConfig.from_json('{"width": 3}')


def test_adaln_zero_start_outputs_zero_velocity():
    torch.manual_seed(0)
    model = SiT(replace(SMALL, num_classes=3))
    v = model(random_triplane(SMALL, 2), torch.rand(2), torch.tensor([0, 2]))
    assert all(bool((p == 0).all()) for p in v.planes())


def test_tokens_of_all_planes_attend_to_each_other():
    model = trained_like(SMALL)
    x = random_triplane(SMALL, 1)
    changed = Triplane(x.xy + 1, x.yt, x.xt)
    t = torch.tensor([0.3])
    with torch.no_grad():
        assert not torch.allclose(model(x, t).xt, model(changed, t).xt)


def test_a_video_in_a_batch_gets_the_velocity_it_gets_alone():
    model = trained_like(SMALL)
    x, t = random_triplane(SMALL, 3), torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        batch, alone = model(x, t), model(x[1], t[1:2])
    for a, b in zip(batch[1].planes(), alone.planes()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_guidance_combines_the_conditional_and_null_velocities():
    model = trained_like(replace(SMALL, num_classes=4))
    x, t, y = random_triplane(SMALL, 2), torch.tensor([0.2, 0.7]), torch.tensor([1, 3])
    with torch.no_grad():
        cond, null = model(x, t, y), model(x, t, torch.full_like(y, model.null_class))
        guided = model.guided(x, t, y, 4.0)
        assert model(x, t).xy.equal(null.xy)  # no labels: the null class
        assert model.guided(x, t, y, 1.0).xy.equal(cond.xy)
    for g, c, n in zip(guided.planes(), cond.planes(), null.planes()):
        torch.testing.assert_close(g, n + 4.0 * (c - n), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(cond.xy, null.xy)


def test_labels_need_a_class_conditional_model_and_guidance_needs_labels():
    model = trained_like(SMALL)
    x, t = random_triplane(SMALL, 1), torch.rand(1)
    with pytest.raises(ValueError, match="unconditional"):
        model(x, t, torch.tensor([0]))
    with pytest.raises(ValueError, match="needs class labels"):
        model.guided(x, t, None, 2.0)
    with pytest.raises(ValueError, match="expects planes"):
        model(random_triplane(replace(SMALL, latent_res_t=4), 1), t)


def test_label_dropout_replaces_labels_by_the_null_class_at_its_rate():
    model = SiT(replace(SMALL, num_classes=5, class_dropout_prob=0.25))
    y = torch.arange(10000) % 5
    dropped = model.drop_labels(y, torch.Generator().manual_seed(0))
    null = dropped == 5
    assert null.float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert torch.equal(dropped[~null], y[~null])
    assert torch.equal(dropped, model.drop_labels(y, torch.Generator().manual_seed(0)))


def test_latent_stats_normalise_round_trip_and_read_the_export_json():
    s = stats(4)
    x = random_triplane(SMALL, 2)
    back = s.denormalise(s.normalise(x))
    for a, b in zip(back.planes(), x.planes()):
        torch.testing.assert_close(a, b)
    export_json = json.dumps({p: {"mean": [0.0] * 4, "std": [2.0] * 4} for p in ("xy", "yt", "xt")})
    assert LatentStats.from_json(export_json).normalise(x).xy.equal(x.xy / 2)
    assert LatentStats.from_json(s.to_json()).to_json() == s.to_json()
    measured = LatentStats.measure(s.denormalise(random_triplane(SMALL, 64)))
    for m, expected in zip(measured.std, s.std):
        torch.testing.assert_close(m, expected, rtol=0.1, atol=0)
    with pytest.raises(ValueError, match="positive"):
        LatentStats(s.mean, (s.std[0], -s.std[1], s.std[2]))


def test_flatten_and_unflatten_are_inverse():
    x = random_triplane(SMALL, 3)
    flat = flatten(x)
    assert flat.shape == (3, 8 * 8 * 4 + 2 * 8 * 8 * 4)
    assert all(a.equal(b) for a, b in zip(unflatten(flat, SMALL.plane_shapes).planes(), x.planes()))


@pytest.mark.parametrize("sampler", ["euler", "heun", "euler-maruyama"])
def test_video_k_is_the_same_alone_as_in_a_batch(sampler):
    model, s = trained_like(SMALL), stats(4)
    batch = generate_triplanes(model, s, num=3, steps=4, sampler=sampler, seed=11)
    alone = generate_triplanes(model, s, num=1, steps=4, sampler=sampler, seed=11, first=2)
    for a, b in zip(batch[2].planes(), alone.planes()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    other_seed = generate_triplanes(model, s, num=1, steps=4, sampler=sampler, seed=12, first=2)
    assert not torch.allclose(other_seed.xy, alone.xy)
    assert not torch.allclose(batch[0].xy, batch[1].xy)


def test_generation_reports_steps_cancels_and_checks_labels():
    model, s = trained_like(replace(SMALL, num_classes=2)), stats(4)
    steps = []
    out = generate_triplanes(model, s, num=2, steps=3, seed=0, label=1, guidance=2.0,
                             on_step=lambda i, n: steps.append((i, n)))
    assert steps == [(1, 3), (2, 3), (3, 3)] and out.yt.shape == (2, 8, 8, 4)
    with pytest.raises(SamplingCancelled):
        generate_triplanes(model, s, num=1, steps=3, should_stop=lambda: True)
    with pytest.raises(ValueError, match=r"label must be in \[0, 2\)"):
        generate_triplanes(model, s, num=1, steps=3, label=2)


def test_generator_file_round_trip(tmp_path):
    model, s = trained_like(replace(SMALL, num_classes=2)), stats(4)
    save_generator(model, tmp_path / "g.safetensors", s, "ab" * 32, {"steps": "7"})
    loaded, metadata = load_generator(tmp_path / "g.safetensors", device="cpu", tokenizer_sha256="ab" * 32)
    assert loaded.config == model.config and not loaded.training
    assert metadata["steps"] == "7" and LatentStats.from_json(metadata["latent_stats"]).to_json() == s.to_json()
    x, t, y = random_triplane(SMALL, 2), torch.rand(2), torch.tensor([0, 1])
    with torch.no_grad():
        assert loaded(x, t, y).yt.equal(model(x, t, y).yt)
    with pytest.raises(ValueError, match="sha256"):
        load_generator(tmp_path / "g.safetensors", device="cpu", tokenizer_sha256="cd" * 32)


def test_generator_files_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="trainer.generator"):
        load_generator(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "tokenizer.safetensors", metadata={"format": "coordtok"})
    with pytest.raises(ValueError, match="not a SiT generator file"):
        load_generator(tmp_path / "tokenizer.safetensors")
    save_generator(SiT(SMALL), tmp_path / "g.safetensors", stats(4), "00" * 32)
    wider = {name: t.contiguous() for name, t in SiT(replace(SMALL, dim=64)).state_dict().items()}
    save_file(wider, tmp_path / "wrong.safetensors", metadata=read_metadata(tmp_path / "g.safetensors"))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_generator(tmp_path / "wrong.safetensors")
