"""Checkpoint I/O: the native safetensors formats of the tokenizer and of the SiT generator, and
import of the public implementation's trainer checkpoints. Nothing here unpickles arbitrary objects."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from coordtok.model.config import CoordTokConfig, SiTConfig, preset, PRESETS
from coordtok.model.coordtok import CoordTok
from coordtok.model.generate import LatentStats
from coordtok.model.sit import SiT

FORMAT = "coordtok"
GENERATOR_FORMAT = "coordtok-sit"
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "default.safetensors"
DEFAULT_GENERATOR = Path(__file__).parent / "weights" / "generator.safetensors"

# Public implementation name (after its DDP `module.` prefix) -> our name. First match wins.
_OFFICIAL_RENAMES = [
    (r"^weight_tokens_(xy|yt|xt)$", r"encoder.planes.\1.query"),
    (r"^encoder\.encoder\.patch_embed\.proj\.", "encoder.video_patch_embed."),
    (r"^encoder\.encoder\.cls_token$", "encoder.cls_token"),
    (r"^encoder\.encoder\.pos_emb$", "encoder.video_pos_embed"),
    (r"^encoder\.encoder\.layers\.", "encoder.video_blocks."),
    (r"^encoder\.encoder\.norm\.", "encoder.video_norm."),
    (r"^encoder\.cross_pos_emb$", "encoder.memory_pos_embed"),
    (r"^encoder\.patch_embeds_(xy|yt|xt)\.proj\.", r"encoder.planes.\1.embed."),
    (r"^encoder\.projectors_(xy|yt|xt)\.", r"encoder.planes.\1.project."),
    (r"^encoder\.transformer\.layers\.(\d+)\.(cross_attn|self_attn)\.in_proj_(weight|bias)$",
     r"encoder.cross_blocks.\1.\2.qkv.\3"),
    (r"^encoder\.transformer\.layers\.(\d+)\.(cross_attn|self_attn)\.out_proj\.", r"encoder.cross_blocks.\1.\2.proj."),
    (r"^encoder\.transformer\.layers\.(\d+)\.mlp\.0\.", r"encoder.cross_blocks.\1.mlp.fc1."),
    (r"^encoder\.transformer\.layers\.(\d+)\.mlp\.3\.", r"encoder.cross_blocks.\1.mlp.fc2."),
    (r"^encoder\.transformer\.layers\.", "encoder.cross_blocks."),
    (r"^encoder\.transformer\.norm\.", "encoder.cross_norm."),
    (r"^decoder\.transformer\.pos_embed$", "decoder.pos_embed"),
    (r"^decoder\.transformer\.patch_embed\.", "decoder.embed."),
    (r"^decoder\.transformer\.layers\.", "decoder.blocks."),
    (r"^decoder\.transformer\.norm\.", "decoder.norm."),
    (r"^decoder\.projector\.", "decoder.to_pixels."),
]
# Training-only modules of the public implementation that a tokenizer does not need.
_OFFICIAL_DROPPED = re.compile(r"^decoder\.lpips_loss\.")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def save_model(model: CoordTok, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write weights as safetensors with the config as JSON in the header metadata."""
    _write(model, path, {"format": FORMAT, "config": model.config.to_json(), **(metadata or {})})


def _write(model: nn.Module, path: str | Path, header: dict[str, str]) -> None:
    """The model's state as safetensors with `header` as metadata, written atomically."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.open("wb").close()  # created as any new file is (the umask), to give save_file's file that mode
    mode = tmp.stat().st_mode & 0o777
    save_file(tensors, str(tmp), metadata=header)
    tmp.chmod(mode)  # save_file makes its files 0600: unreadable to a server running as another user
    tmp.replace(path)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks: the identity of a weights file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def load_model(
    path_or_preset: str | Path | None = None, device: str | torch.device | None = None, seed: int = 0
) -> CoordTok:
    """Load native weights (a .safetensors path), or build a preset with random weights (seeded).

    With no argument, loads the bundled default model. The model is returned in eval mode.
    """
    device = torch.device(device) if device is not None else default_device()
    if isinstance(path_or_preset, str) and path_or_preset in PRESETS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CoordTok(preset(path_or_preset))
        return model.to(device).eval()
    path = Path(path_or_preset) if path_or_preset is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}; pass a .safetensors path or one of {sorted(PRESETS)}")
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise ValueError(f"{path} is not a CoordTok safetensors file (its header lacks the config)")
    model = CoordTok(CoordTokConfig.from_json(metadata["config"]))
    load_state_checked(model, _read_tensors(path), str(path), "the model config")
    return model.to(device).eval()


def save_generator(
    model: SiT, path: str | Path, stats: LatentStats, tokenizer_sha256: str, metadata: dict[str, str] | None = None
) -> None:
    """Write a SiT generator as safetensors; the header holds its config, the latent statistics it
    was trained with and the sha256 of the tokenizer weights whose triplanes it generates."""
    header = {
        **(metadata or {}), "format": GENERATOR_FORMAT, "config": model.config.to_json(),
        "latent_stats": stats.to_json(), "tokenizer_sha256": tokenizer_sha256,
    }
    _write(model, path, header)


def load_generator(
    path: str | Path | None = None, device: str | torch.device | None = None, tokenizer_sha256: str | None = None
) -> tuple[SiT, dict[str, str]]:
    """Load a generator written by `save_generator` (default: `DEFAULT_GENERATOR`), in eval mode,
    and its header metadata (`LatentStats.from_json(metadata["latent_stats"])` gives its stats).
    With `tokenizer_sha256`, the file must have been trained on that tokenizer."""
    device = torch.device(device) if device is not None else default_device()
    path = Path(path) if path is not None else DEFAULT_GENERATOR
    if not path.is_file():
        raise FileNotFoundError(
            f"no generator weights at {path}; train one with `python -m coordtok.trainer.generator --tokenizer TOKENIZER "
            "--videos DIR --run-dir RUN` and pass RUN/export.safetensors"
        )
    metadata = read_metadata(path)
    missing = [key for key in ("config", "latent_stats", "tokenizer_sha256") if key not in metadata]
    if metadata.get("format") != GENERATOR_FORMAT or missing:
        raise ValueError(f"{path} is not a SiT generator file (format {metadata.get('format')!r}, lacking {missing})")
    config = SiTConfig.from_json(metadata["config"])
    if LatentStats.from_json(metadata["latent_stats"]).channels != config.latent_channels:
        raise ValueError(f"{path}: its latent stats do not have the config's {config.latent_channels} channels")
    if tokenizer_sha256 is not None and metadata["tokenizer_sha256"] != tokenizer_sha256:
        raise ValueError(
            f"{path} generates the triplanes of the tokenizer with weights sha256 {metadata['tokenizer_sha256']}, "
            f"not of {tokenizer_sha256}"
        )
    model = SiT(config)
    load_state_checked(model, _read_tensors(path), str(path), "the generator config")
    return model.to(device).eval(), metadata


def official_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """Map a public-implementation checkpoint ({'model': state_dict, ...} or a bare state
    dict, keys optionally prefixed `module.`) to this project's parameter names."""
    state = checkpoint.get("model", checkpoint)
    renamed = {}
    for key, tensor in state.items():
        key = key.removeprefix("module.")
        if _OFFICIAL_DROPPED.match(key):
            continue
        for pattern, replacement in _OFFICIAL_RENAMES:
            new_key, count = re.subn(pattern, replacement, key)
            if count:
                key = new_key
                break
        renamed[key] = tensor
    return renamed


def load_official(
    checkpoint_path: str | Path, config_path: str | Path, device: str | torch.device | None = None
) -> CoordTok:
    """Load a checkpoint of the public implementation's trainer with its constructor config
    (JSON of its keyword arguments). The model reproduces the reference's behaviour exactly
    (`reference_compat`)."""
    config = CoordTokConfig.from_official(json.loads(Path(config_path).read_text()))
    checkpoint = torch.load(str(checkpoint_path), map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{checkpoint_path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    model = CoordTok(config)
    load_state_checked(model, official_state_dict(checkpoint), str(checkpoint_path), "the model config")
    device = torch.device(device) if device is not None else default_device()
    return model.to(device).eval()


def load_state_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    """Load `state` into `module` strictly, or raise a ValueError that names the missing,
    unexpected and mis-shaped tensors (`what` says what the file should have been)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if mismatched:
        problems.append(f"shape mismatch {mismatched[:3]}")
    if problems:
        raise ValueError(f"{source} does not match {what}: " + "; ".join(problems))
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
