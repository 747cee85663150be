"""The codec initialisation: before any training step, the network computes the designed codec."""
import math

import pytest
import torch

from coordtok.model import CoordTok, preset
from coordtok.model.config import CoordTokConfig
from coordtok.model.triplane import video_to_patches
from coordtok.trainer.codec_init import check_layout, codec_init, fit_bases
from coordtok.trainer.views import random_patches

# The smallest layout codec_init accepts: 16 frames of 32x32, a 4x4 / 2 x 4x4 triplane of 4
# channels, 8x8 decoder patches, 2x2-cell query tokens (one 4x16x16 encoder token each).
CONFIG = CoordTokConfig(
    frames=16, height=32, width=32, enc_dim=64, enc_heads=4, enc_patch_t=8, enc_patch_xy=16,
    enc_vit_layers=1, enc_cross_layers=2, latent_res_xy=4, latent_res_t=4, latent_channels=4,
    latent_patch_xy=2, latent_patch_t=2, dec_dim=32, dec_heads=2, dec_layers=2, dec_patch_xy=8,
    decode_slice_frames=4,
)


def moving_clips(count: int, seed: int) -> torch.Tensor:
    """[count, 16, 32, 32, 3] in [-1, 1]: smooth colour gradients sliding at random speeds."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(16.0)[:, None, None, None]
    x = torch.arange(32.0)[None, :, None, None]
    y = torch.arange(32.0)[None, None, :, None]
    clips = []
    for _ in range(count):
        freq, speed, phase = torch.rand(3, 3, generator=g) * torch.tensor([[0.12], [0.2], [6.0]])
        clips.append(0.8 * torch.sin(freq * x + 0.7 * freq * y - speed * t + phase))
    return torch.stack(clips)


def reference_triplane(clip: torch.Tensor, bases) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The codec written directly (trainer/codec_init.py's docstring): xy [4, 4, C], yt and xt [4, 4, C]."""
    patches = video_to_patches(clip[None], CONFIG)[0].reshape(16, 4, 4, -1)  # [T, nx, ny, V]
    static = patches.mean(0)
    motion = patches - static
    cells = lambda m: m.reshape(4, 4, 4, -1).mean(1)  # 4 frames per t cell
    xy = (static - bases.mu) @ bases.xy
    xt = cells(motion.mean(2)) @ bases.xt  # [t cell, x, C]
    yt = cells(motion.mean(1)) @ bases.yt
    return xy, yt, xt


@pytest.fixture(scope="module")
def initialised() -> tuple[CoordTok, torch.Tensor]:
    torch.manual_seed(0)
    model = CoordTok(CONFIG).eval()
    clips = moving_clips(12, seed=0)
    codec_init(model, clips, torch.full((12,), 16), samples=256)
    return model, clips


def test_encoder_computes_the_codec_triplane(initialised):
    model, clips = initialised
    bases = fit_bases(clips, CONFIG)
    held = moving_clips(3, seed=1)
    with torch.no_grad():
        triplane = model.encode(held)
    for i, clip in enumerate(held):
        for actual, expected in zip(triplane[i].planes(), reference_triplane(clip, bases)):
            # Exact but for the LayerNorms, whose scale the +A/-A pair fixes to within a few per cent.
            assert (actual[0] - expected).abs().max() < 0.05 * expected.abs().max()


def test_decoder_reconstructs_unseen_clips_at_once(initialised):
    """The least-squares decoder on the codec's features: far better than the clips' mean colour,
    before any gradient step."""
    model, _ = initialised
    held = moving_clips(3, seed=1)
    with torch.no_grad():
        video = model.decode_video(model.encode(held))
    mse = ((video - held) ** 2).mean()
    mean_colour = ((held - held.mean(dim=(1, 2, 3), keepdim=True)) ** 2).mean()
    assert mse < 0.2 * mean_colour
    assert 10 * math.log10(4 / mse) > 20


def test_initialised_model_trains():
    """Gradients reach the zero-initialised branches, and a few steps on one batch lower its loss."""
    torch.manual_seed(0)
    model = CoordTok(CONFIG)
    clips, n_frames = moving_clips(8, seed=2), torch.full((8,), 16)
    codec_init(model, clips, n_frames, samples=256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    coords, targets = random_patches(clips, n_frames, CONFIG, 64, torch.Generator().manual_seed(3))
    losses = []
    for _ in range(15):
        loss = ((model(clips, n_frames, coords) - targets) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert model.decoder.blocks[0].mlp.fc2.weight.abs().sum() > 0
    assert model.encoder.cross_blocks[-1].cross_attn.proj.weight.abs().sum() > 0


def test_layouts_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="encoder token must cover one query token"):
        check_layout(preset("coordtok-l"))
    check_layout(preset("coordtok-tiny"))
