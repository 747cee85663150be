"""The bundled models: `load_model()` and `load_generator()` find them, they hold trained weights,
the tokenizer reconstructs a generated clip, and the generator belongs to the bundled tokenizer."""
import json

import numpy as np
import torch

from coordtok.model import LatentStats, generate_triplanes, load_generator, load_model, preset
from coordtok.model.checkpoint import DEFAULT_WEIGHTS, file_sha256, read_metadata
from coordtok.model.triplane import PLANES
from coordtok.trainer.metrics import psnr, trilinear_baseline


def test_load_model_without_arguments_loads_the_bundled_tokenizer():
    model = load_model(device="cpu")
    assert model.config == preset("coordtok-tiny") and not model.training
    metadata = read_metadata(DEFAULT_WEIGHTS)
    stats = json.loads(metadata["latent_stats"])
    assert set(stats) == set(PLANES) and all(len(stats[p]["std"]) == model.config.latent_channels for p in PLANES)
    assert int(metadata["steps"]) > 0


@torch.inference_mode()
def test_bundled_weights_are_not_a_fresh_initialisation():
    trained, untrained = load_model(device="cpu"), load_model("coordtok-tiny", device="cpu")
    changed = [name for name, p in trained.state_dict().items() if not torch.equal(p, untrained.state_dict()[name])]
    assert len(changed) == len(trained.state_dict())
    assert all(torch.isfinite(p).all() for p in trained.parameters())


def textured_clip(frames: int = 128, size: int = 128) -> torch.Tensor:
    """A static, smoothly textured colour clip [1, T, H, W, 3] in [-1, 1]: content the bundled
    tokenizer's triplane can hold (its xy plane), unlike 2-D motion."""
    y, x = np.mgrid[:size, :size][..., None]
    colour = np.array([1.0, 0.7, 0.4])
    image = 0.5 * np.sin(0.06 * x * colour + 0.09 * y) + 0.3 * np.cos(0.13 * y * colour[::-1] - 0.04 * x)
    return torch.tensor(np.broadcast_to(image, (frames, size, size, 3)), dtype=torch.float32)[None]


@torch.inference_mode()
def test_bundled_tokenizer_reconstructs_a_clip_it_never_saw():
    video = textured_clip()
    n_frames = torch.tensor([video.shape[1]])
    scores = {}
    for name in ("bundled", "coordtok-tiny"):
        model = load_model(None if name == "bundled" else name, device="cpu")
        scores[name] = psnr(model.decode_video(model.encode(video, n_frames)).clamp(-1, 1), video).item()
    budget = model.config.tokens * model.config.latent_channels  # the model's 10,240 floats
    baseline = psnr(trilinear_baseline(video, budget)[0], video).item()
    assert scores["bundled"] > scores["coordtok-tiny"] + 10  # about 31.6 dB against 12.4
    assert scores["bundled"] > baseline - 1.5  # the baseline scores about 32.2 dB


@torch.inference_mode()
def test_bundled_generator_belongs_to_the_bundled_tokenizer_and_is_trained():
    tokenizer = load_model(device="cpu")
    generator, metadata = load_generator(device="cpu", tokenizer_sha256=file_sha256(DEFAULT_WEIGHTS))
    assert generator.config.plane_shapes[0] == (tokenizer.config.latent_res_xy, tokenizer.config.latent_res_xy,
                                                tokenizer.config.latent_channels)
    assert int(metadata["steps"]) > 0
    stats = LatentStats.from_json(metadata["latent_stats"])
    triplane = generate_triplanes(generator, stats, num=1, steps=4, seed=0)
    # A fresh SiT (adaLN-Zero) predicts zero velocity: any step count would return the same noise.
    one_step = generate_triplanes(generator, stats, num=1, steps=1, seed=0)
    assert not torch.equal(triplane.xy, one_step.xy)
    frames = tokenizer.decode_video(triplane, frames=(0, 4))
    assert frames.shape == (1, 4, 128, 128, 3) and torch.isfinite(frames).all()
