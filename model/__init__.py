"""CoordTok networks, configs and checkpoint I/O.

Public API: `load_model`, `load_official`, `save_model`, `CoordTok`, `CoordTokConfig`, `Triplane`.
"""
from model.checkpoint import load_model, load_official, save_model
from model.config import PRESETS, CoordTokConfig, preset
from model.coordtok import CoordTok
from model.triplane import Triplane

__all__ = ["CoordTok", "CoordTokConfig", "PRESETS", "Triplane", "load_model", "load_official", "preset", "save_model"]
