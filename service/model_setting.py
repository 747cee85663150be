"""The model setting (`COORDTOK_MODEL`, `--model`): '' the bundled weights, a .safetensors path, or
`preset:NAME`, that preset with random weights (asked for explicitly); and the generator that fits it."""
from __future__ import annotations

from pathlib import Path

from coordtok.model import CoordTok, PRESETS, load_model
from coordtok.model.checkpoint import DEFAULT_WEIGHTS, file_sha256
from coordtok.service import jobs

RANDOM_PREFIX = "preset:"  # a model setting `preset:NAME`: that preset with random weights


def random_preset(spec: str) -> str | None:
    """NAME of a `preset:NAME` model setting (random weights, asked for explicitly), else None."""
    return spec[len(RANDOM_PREFIX):] if spec.startswith(RANDOM_PREFIX) else None


def load_served_model(spec: str, device: str) -> CoordTok:
    """The model of a model setting: '' the bundled weights, a .safetensors path, or
    `preset:NAME` (random weights). A bare preset name is refused: it would serve random weights
    without saying so."""
    name = random_preset(spec)
    if name is not None:
        if name not in PRESETS:
            raise ValueError(f"{spec!r}: no preset {name!r}; the presets are {', '.join(sorted(PRESETS))}")
        return load_model(name, device)
    if spec in PRESETS and not Path(spec).is_file():
        raise ValueError(f"{spec!r} is a preset name, not a weights file, and a preset alone has random weights: "
                         f"pass a .safetensors file, or say '{RANDOM_PREFIX}{spec}' (coordtok: --model {spec} "
                         "--random-weights) to run random weights on purpose")
    return load_model(Path(spec) if spec else None, device)


def random_weights_warning(spec: str) -> str | None:
    """The warning a server or command gives for random weights, else None."""
    name = random_preset(spec)
    return None if name is None else (f"the model has random weights ({RANDOM_PREFIX}{name}): its reconstructions are "
                                      "noise; pass a trained .safetensors file for real ones")


def model_identity(spec: str) -> tuple[str, str]:
    """(model id, weights sha256) of a model setting ('' = the bundled model; `preset:NAME`: no weights file)."""
    name = random_preset(spec)
    if name is not None:
        return f"{name}@random", ""
    path = Path(spec) if spec else DEFAULT_WEIGHTS
    digest = file_sha256(path)
    return f"{path.stem}@{digest[:12]}", digest


def fitting_generator(generator: str, model: str, sha256: str, config, device: str) -> tuple[jobs.Generator | None, str]:
    """`jobs.load_generator` for the tokenizer of the `model` setting: none for random weights,
    since a generator is made for one trained tokenizer's weights."""
    name = random_preset(model)
    if name is not None:
        return None, f"the tokenizer has random weights ({RANDOM_PREFIX}{name}); no generator is made for those"
    return jobs.load_generator(generator, sha256, config, device)
