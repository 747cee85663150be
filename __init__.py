"""CoordTok: the video tokenizer of Jang et al. (CVPR 2025), its generator, trainer and service.

The repository installs as this package (pyproject.toml maps its folders to coordtok.model,
coordtok.kernels, coordtok.trainer and coordtok.service). The public API:

    import coordtok
    model = coordtok.load_model()                       # the bundled default tokenizer
    model = coordtok.load_official("coordtok.pt")       # an authors' checkpoint
    coordtok.save_model(model, "mine.safetensors")
    with coordtok.Client("http://localhost:8000") as client: ...
"""
from coordtok.model.checkpoint import load_model, load_official, save_model
from coordtok.service.client import Client

__all__ = ["Client", "load_model", "load_official", "save_model"]
