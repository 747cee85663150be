"""Configurations: frozen dataclasses and their named presets, for the CoordTok tokenizer and the
SiT generator over its triplanes.

Shapes follow the paper: a video of `frames x height x width` RGB pixels is encoded into a
triplane of `latent_channels` features per cell, with planes
`xy [latent_res_xy, latent_res_xy]`, `yt [latent_res_t, latent_res_xy]` and
`xt [latent_res_t, latent_res_xy]`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


class _JSONConfig:
    """JSON of a config dataclass's fields; unknown fields are an error."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        values = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
        return cls(**values)


def _require_divisible(config: object, remainders: dict[str, int]) -> None:
    bad = [name for name, remainder in remainders.items() if remainder]
    if bad:
        raise ValueError(f"{type(config).__name__}: these must divide evenly: {', '.join(bad)}")


@dataclass(frozen=True)
class CoordTokConfig(_JSONConfig):
    # Video the model was built for: frames x height x width.
    frames: int = 128
    height: int = 128
    width: int = 128

    # Encoder: 3D patch embedding, a ViT over the video patches, then cross-attention blocks in
    # which the triplane query tokens attend to the video tokens.
    enc_dim: int = 1024
    enc_heads: int = 16
    enc_patch_t: int = 8
    enc_patch_xy: int = 16
    enc_vit_layers: int = 8
    enc_cross_layers: int = 24

    # Triplane: resolutions, channels, and the patch size of the query tokens per plane.
    latent_res_xy: int = 16
    latent_res_t: int = 32
    latent_channels: int = 8
    latent_patch_xy: int = 8
    latent_patch_t: int = 16

    # Decoder: a ViT over the sampled patch features, projected to pixels.
    dec_dim: int = 1024
    dec_heads: int = 16
    dec_layers: int = 24
    dec_patch_t: int = 1
    dec_patch_xy: int = 8
    # The decoder's learned position embedding: "full", one entry per (t, x, y) patch (the
    # paper's: nt * nx * ny rows), or "factorised", the sum of a t, an x and a y entry
    # (nt + nx + ny rows).
    dec_pos_embed: str = "full"

    # decode_video slices the video into this many frames per decoder pass (stage-2 view size).
    decode_slice_frames: int = 16

    # Reproduce two behaviours of the public implementation (its checkpoints need them):
    # the padding mask is added to the attention logits as +1.0 instead of excluding padded
    # tokens, and position indices are recovered from coordinates by truncation.
    reference_compat: bool = False

    def __post_init__(self) -> None:
        checks = {
            "frames % enc_patch_t": self.frames % self.enc_patch_t,
            "height % enc_patch_xy": self.height % self.enc_patch_xy,
            "width % enc_patch_xy": self.width % self.enc_patch_xy,
            "frames % dec_patch_t": self.frames % self.dec_patch_t,
            "height % dec_patch_xy": self.height % self.dec_patch_xy,
            "width % dec_patch_xy": self.width % self.dec_patch_xy,
            "latent_res_xy % latent_patch_xy": self.latent_res_xy % self.latent_patch_xy,
            "latent_res_t % latent_patch_t": self.latent_res_t % self.latent_patch_t,
            "enc_dim % enc_heads": self.enc_dim % self.enc_heads,
            "dec_dim % dec_heads": self.dec_dim % self.dec_heads,
            "decode_slice_frames % dec_patch_t": self.decode_slice_frames % self.dec_patch_t,
        }
        _require_divisible(self, checks)
        if self.dec_pos_embed not in ("full", "factorised"):
            raise ValueError("CoordTokConfig: dec_pos_embed must be 'full' or 'factorised'")
        if not 1 <= self.decode_slice_frames <= self.frames:
            raise ValueError("CoordTokConfig: decode_slice_frames must be in [1, frames]")

    @property
    def tokens(self) -> int:
        """Latent cells per clip: Rxy^2 + 2 * Rt * Rxy (1,280 for the paper's model)."""
        return self.latent_res_xy**2 + 2 * self.latent_res_t * self.latent_res_xy

    @property
    def patch_values(self) -> int:
        """Pixel values per decoded patch: pt * px * py * 3."""
        return self.dec_patch_t * self.dec_patch_xy**2 * 3

    @classmethod
    def from_official(cls, kwargs: dict) -> CoordTokConfig:
        """Map the public implementation's constructor arguments (its `config.json`)."""
        frames, height, width = kwargs["video_shape"]
        if kwargs.get("enc_patch_type", "transformer") != "transformer":
            raise ValueError("only enc_patch_type='transformer' exists in the public implementation")
        if height != width:
            raise ValueError("the public implementation's encoder only supports square frames")
        patches_per_frame = (height // kwargs["dec_patch_size_xy"]) ** 2
        # The reference fine-tunes on 4,096 patches per video: 16 frames at 128x128 / 8x8.
        stage2_frames = max(1, 4096 // patches_per_frame) * kwargs["dec_patch_size_t"]
        return cls(
            frames=frames,
            height=height,
            width=width,
            enc_dim=kwargs["enc_embed_dim"],
            enc_heads=kwargs["enc_num_heads"],
            enc_patch_t=kwargs["enc_patch_size_t"],
            enc_patch_xy=kwargs["enc_patch_size_xy"],
            enc_vit_layers=kwargs["enc_patch_num_layers"],
            enc_cross_layers=kwargs["enc_num_layers"],
            latent_res_xy=kwargs["latent_resolution_xy"],
            latent_res_t=kwargs["latent_resolution_t"],
            latent_channels=kwargs["latent_n_features"],
            latent_patch_xy=kwargs["latent_patch_size_xy"],
            latent_patch_t=kwargs["latent_patch_size_t"],
            dec_dim=kwargs["dec_embed_dim"],
            dec_heads=kwargs["dec_num_heads"],
            dec_layers=kwargs["dec_num_layers"],
            dec_patch_t=kwargs["dec_patch_size_t"],
            dec_patch_xy=kwargs["dec_patch_size_xy"],
            decode_slice_frames=min(frames, stage2_frames),
            reference_compat=True,
        )


# The paper's model (CoordTok-L) and the scaled-down sizes of its model-size study. The paper
# names S/B/L without their widths; S and B follow the ViT-S/B widths and depths (our choice).
PRESETS: dict[str, CoordTokConfig] = {
    "coordtok-l": CoordTokConfig(),
    "coordtok-b": CoordTokConfig(
        enc_dim=768, enc_heads=12, enc_vit_layers=6, enc_cross_layers=12,
        dec_dim=768, dec_heads=12, dec_layers=12,
    ),
    "coordtok-s": CoordTokConfig(
        enc_dim=384, enc_heads=6, enc_vit_layers=4, enc_cross_layers=8,
        dec_dim=384, dec_heads=6, dec_layers=8,
    ),
    # Trains and serves on a 2-core CPU: same video and triplane shapes as the paper's model
    # (1,280 tokens per 128-frame clip), narrow and shallow networks, and 4-frame decode slices
    # (1,024 patches, as many as a stage-1 step reconstructs). Its query tokens cover 2x2 cells,
    # one encoder token's worth, and its encoder is 144 wide: the layout that
    # trainer/codec_init.py can start from a linear codec. Its decoder positions are factorised
    # (20 K parameters instead of the full table's 4.2 M, which memorised the training videos).
    "coordtok-tiny": CoordTokConfig(
        enc_dim=144, enc_heads=4, enc_vit_layers=2, enc_cross_layers=4,
        latent_patch_xy=2, latent_patch_t=2,
        dec_dim=128, dec_heads=4, dec_layers=4, dec_pos_embed="factorised", decode_slice_frames=4,
    ),
}


def preset(name: str) -> CoordTokConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


@dataclass(frozen=True)
class SiTConfig(_JSONConfig):
    """The SiT generator: a transformer over the patches of a CoordTok triplane."""

    # The triplane it generates (`latent_shape` reads them from a tokenizer's config):
    # xy [latent_res_xy, latent_res_xy, C], yt and xt [latent_res_t, latent_res_xy, C].
    latent_res_xy: int = 16
    latent_res_t: int = 32
    latent_channels: int = 8

    # Transformer over patch x patch cells of every plane.
    patch: int = 2
    dim: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0

    # Classes (0: unconditional). A class-conditional model also learns a null class, which a
    # training label becomes with probability class_dropout_prob (classifier-free guidance).
    num_classes: int = 0
    class_dropout_prob: float = 0.1

    def __post_init__(self) -> None:
        checks = {
            "latent_res_xy % patch": self.latent_res_xy % self.patch,
            "latent_res_t % patch": self.latent_res_t % self.patch,
            "dim % heads": self.dim % self.heads,
            "dim % 4 (2D sine-cosine positions)": self.dim % 4,
        }
        _require_divisible(self, checks)
        if self.num_classes < 0 or not 0 <= self.class_dropout_prob < 1:
            raise ValueError("SiTConfig: num_classes must be >= 0 and class_dropout_prob in [0, 1)")

    @property
    def plane_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """Per plane (xy, yt, xt), one clip's shape (R0, R1, C)."""
        xy, t, c = self.latent_res_xy, self.latent_res_t, self.latent_channels
        return (xy, xy, c), (t, xy, c), (t, xy, c)

    @property
    def tokens(self) -> int:
        """Transformer tokens per clip (320 for the paper's triplane at patch 2)."""
        return sum(r0 // self.patch * (r1 // self.patch) for r0, r1, _ in self.plane_shapes)


# The DiT/SiT sizes (width, depth, heads) at patch 2, over the paper's triplane; the paper trains
# SiT-L/2. `sit_preset` fits a preset to a tokenizer's triplane.
SIT_PRESETS: dict[str, SiTConfig] = {
    "sit-s/2": SiTConfig(dim=384, depth=12, heads=6),
    "sit-b/2": SiTConfig(dim=768, depth=12, heads=12),
    "sit-l/2": SiTConfig(dim=1024, depth=24, heads=16),
    "sit-xl/2": SiTConfig(dim=1152, depth=28, heads=16),
    # Trains and samples on a CPU.
    "sit-tiny": SiTConfig(dim=128, depth=4, heads=4),
}


def latent_shape(tokenizer: CoordTokConfig) -> dict[str, int]:
    """The SiTConfig fields that describe `tokenizer`'s triplane."""
    return {
        "latent_res_xy": tokenizer.latent_res_xy,
        "latent_res_t": tokenizer.latent_res_t,
        "latent_channels": tokenizer.latent_channels,
    }


def sit_preset(name: str, tokenizer: CoordTokConfig | None = None) -> SiTConfig:
    """The named SiT preset, over `tokenizer`'s triplane (default: the paper's)."""
    try:
        config = SIT_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown SiT preset {name!r}; choose one of {sorted(SIT_PRESETS)}") from None
    return dataclasses.replace(config, **latent_shape(tokenizer)) if tokenizer is not None else config
