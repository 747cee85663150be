"""The bundled default tokenizer: `load_model()` finds it, and it holds trained weights."""
import json

import torch

from model import load_model, preset
from model.checkpoint import DEFAULT_WEIGHTS, read_metadata
from model.triplane import PLANES


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
