"""CoordTok networks, the SiT generator over their triplanes, configs and checkpoint I/O.

Public API: `load_model`, `load_official`, `save_model`, `CoordTok`, `CoordTokConfig`, `Triplane`;
for generation `load_generator`, `save_generator`, `generate_triplanes`, `LatentStats`, `SiT`,
`SiTConfig`, `sit_preset`.
"""
from coordtok.model.checkpoint import load_generator, load_model, load_official, save_generator, save_model
from coordtok.model.config import PRESETS, SIT_PRESETS, CoordTokConfig, SiTConfig, preset, sit_preset
from coordtok.model.coordtok import CoordTok
from coordtok.model.generate import LatentStats, generate_triplanes
from coordtok.model.sit import SiT
from coordtok.model.triplane import Triplane

__all__ = [
    "CoordTok", "CoordTokConfig", "LatentStats", "PRESETS", "SIT_PRESETS", "SiT", "SiTConfig", "Triplane",
    "generate_triplanes", "load_generator", "load_model", "load_official", "preset", "save_generator", "save_model",
    "sit_preset",
]
