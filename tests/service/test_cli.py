"""The `coordtok` command: import-official converts exactly; roundtrip reports a reconstruction."""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from model import load_model, load_official
from service.cli import main

OFFICIAL = Path(__file__).resolve().parents[1] / "data" / "official" / "tiny"


def test_import_official_writes_an_equivalent_native_file(tmp_path):
    out = tmp_path / "tiny.safetensors"
    assert main(["import-official", str(OFFICIAL / "checkpoint.pth"), "--config", str(OFFICIAL / "config.json"), "-o", str(out)]) == 0
    native, official = load_model(out, device="cpu"), load_official(OFFICIAL / "checkpoint.pth", OFFICIAL / "config.json", device="cpu")
    assert native.config == official.config and native.config.reference_compat
    v = load_file(str(OFFICIAL / "vectors.safetensors"))
    with torch.no_grad():
        assert torch.equal(native.encode(v["video"], v["n_frames"]).xy, official.encode(v["video"], v["n_frames"]).xy)


def test_import_official_with_a_mismatched_config_is_a_clear_error(tmp_path, capsys):
    config = json.loads((OFFICIAL / "config.json").read_text())
    config["dec_embed_dim"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    code = main(["import-official", str(OFFICIAL / "checkpoint.pth"), "--config", str(tmp_path / "config.json"), "-o", str(tmp_path / "x.safetensors")])
    assert code == 2
    assert "does not match the model config" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_roundtrip_reports_psnr_of_an_imported_model(tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    main(["import-official", str(OFFICIAL / "checkpoint.pth"), "--config", str(OFFICIAL / "config.json"), "-o", str(out)])
    capsys.readouterr()
    assert main(["roundtrip", "--model", str(out), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["clip"] == [16, 32, 32] and report["tokens"] == 8 * 8 + 2 * 8 * 8
    assert 0 < report["psnr_db"] < 100


def test_load_model_rejects_a_file_that_is_not_a_coordtok_model(tmp_path):
    from safetensors.torch import save_file
    import pytest

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a CoordTok"):
        load_model(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="no model file"):
        load_model(tmp_path / "missing.safetensors")


def test_encode_and_decode_commands_in_process(tmp_path):
    import numpy as np

    from model import CoordTok, save_model
    from service.media import MediaLimits, read_frames, write_video
    from tests.service.test_engine import CONFIG

    torch.manual_seed(0)
    save_model(CoordTok(CONFIG), tmp_path / "small.safetensors")
    frames = (np.random.default_rng(0).uniform(0, 255, (12, 20, 20, 3))).astype(np.uint8)
    write_video(frames, tmp_path / "clip.mp4", fps=12)
    model = ["--model", str(tmp_path / "small.safetensors")]
    assert main(["encode", str(tmp_path / "clip.mp4"), "-o", str(tmp_path / "t.npz"), *model]) == 0
    assert main(["decode", str(tmp_path / "t.npz"), "-o", str(tmp_path / "out.mp4"), "--frames", "2:10", *model]) == 0
    decoded, info, _ = read_frames(tmp_path / "out.mp4", MediaLimits())
    assert decoded.shape == (8, 16, 16, 3) and abs(info.fps - 12) < 0.01
