"""The `coordtok` command: import-official converts exactly; roundtrip scores a real clip beside the
trilinear baseline; encode and decode in-process with their options; every mistake a user can make
on the command line is one `coordtok: error:` (or argparse) line that says what to do, before any
work is done."""
import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from coordtok.model import CoordTok, load_model, load_official, save_model
from coordtok.service.cli import build_parser, main
from coordtok.service.commands.roundtrip import SAMPLE_CLIP
from coordtok.formats.video import MediaLimits, read_frames
from coordtok.formats.video_write import write_video
from tests.service.server_process import ROOT, free_port
from tests.service.test_engine import CONFIG

OFFICIAL = Path(__file__).resolve().parents[1] / "data" / "official" / "tiny"


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "small.safetensors"
    torch.manual_seed(0)
    save_model(CoordTok(CONFIG), path)
    return path


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


def test_roundtrip_scores_the_shipped_real_clip_beside_the_trilinear_baseline(small_model, capsys):
    from coordtok.trainer.evaluate import evaluate

    assert SAMPLE_CLIP.is_file() and read_frames(SAMPLE_CLIP, MediaLimits())[1].codec == "cinepak"  # a real clip, in AVI
    assert main(["roundtrip", "--model", str(small_model), "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["video"] == str(SAMPLE_CLIP) and report["clips"] == 1 and report["clip"] == [8, 16, 16]
    expected = evaluate(load_model(small_model, device="cpu"), [SAMPLE_CLIP], max_clips=1)["mean"]
    for method, scores in (("coordtok", report["coordtok"]), ("baseline", report["trilinear_baseline"])):
        assert scores["psnr_db"] == round(expected[method]["psnr"], 2) and scores["ssim"] == round(expected[method]["ssim"], 3)
    assert report["coordtok"]["psnr_db"] != report["trilinear_baseline"]["psnr_db"]

    assert main(["roundtrip", "--model", str(small_model), "--device", "cpu"]) == 0  # the text a person reads
    text = capsys.readouterr().out
    assert "sample.avi" in text and f"{report['coordtok']['psnr_db']:.2f} dB" in text
    assert "trilinear baseline" in text and f"{report['trilinear_baseline']['psnr_db']:.2f} dB" in text


def test_roundtrip_of_any_video_and_of_an_imported_model(tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    main(["import-official", str(OFFICIAL / "checkpoint.pth"), "--config", str(OFFICIAL / "config.json"), "-o", str(out)])
    frames = np.random.default_rng(0).integers(0, 255, (20, 40, 40, 3), dtype=np.uint8)
    write_video(frames, tmp_path / "clip.mp4", fps=10)
    capsys.readouterr()
    assert main(["roundtrip", str(tmp_path / "clip.mp4"), "--model", str(out), "--device", "cpu", "--clips", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["clip"] == [16, 32, 32] and report["tokens"] == 8 * 8 + 2 * 8 * 8
    assert report["clips"] == 2 and report["frames_scored"] == 20


def test_a_preset_name_alone_is_refused_and_random_weights_are_said(capsys):
    assert main(["roundtrip", "--model", "coordtok-tiny", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "preset name" in err and "--random-weights" in err and "preset:coordtok-tiny" in err
    assert main(["roundtrip", "--model", "missing.safetensors", "--random-weights"]) == 2
    assert "--random-weights needs --model PRESET" in capsys.readouterr().err


def test_load_model_rejects_a_file_that_is_not_a_coordtok_model(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a CoordTok"):
        load_model(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="no model file"):
        load_model(tmp_path / "missing.safetensors")


def test_encode_and_decode_in_process_with_a_time_range_and_the_source_size(small_model, tmp_path, capsys):
    frames = (np.random.default_rng(0).uniform(0, 255, (24, 20, 30, 3))).astype(np.uint8)
    write_video(frames, tmp_path / "clip.mp4", fps=12)
    model = ["--model", str(small_model)]
    assert main(["encode", str(tmp_path / "clip.mp4"), "-o", str(tmp_path / "t.npz"), "--resize", "pad",
                 "--start", "0.5", "--end", "1.5", *model]) == 0
    assert "2 clip(s)" in capsys.readouterr().out  # seconds 0.5 to 1.5 at 12 fps: 12 frames, in clips of 8
    assert main(["decode", str(tmp_path / "t.npz"), "-o", str(tmp_path / "out.mp4"), "--frames", "2:10", *model]) == 0
    decoded, info, _ = read_frames(tmp_path / "out.mp4", MediaLimits())
    assert decoded.shape == (8, 16, 16, 3) and abs(info.fps - 12) < 0.01
    assert main(["decode", str(tmp_path / "t.npz"), "-o", str(tmp_path / "big.npy"), "--restore-size", *model]) == 0
    assert np.load(tmp_path / "big.npy").shape == (12, 20, 30, 3)
    assert "generation is off" not in capsys.readouterr().err  # in-process runs never generate: nothing to say


@pytest.mark.parametrize("frames, says", [("abc", "takes A:B"), ("30:10", "the range is reversed"), ("4:4", "the range is empty"),
                                          ("-1:4", "numbered from 0")])
def test_a_bad_frame_range_says_how_to_write_one(frames, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["decode", str(tmp_path / "t.safetensors"), "-o", str(tmp_path / "out.mp4"), f"--frames={frames}"])
    assert exit.value.code == 2 and says in capsys.readouterr().err


def test_a_server_that_is_not_there_is_named_with_a_hint_and_a_bare_host_port_is_a_url(tmp_path, capsys):
    write_video(np.zeros((2, 16, 16, 3), np.uint8), tmp_path / "clip.mp4", fps=2)
    port = free_port()
    assert main(["encode", str(tmp_path / "clip.mp4"), "-o", str(tmp_path / "t.npz"), "--server", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert f"nothing answers at http://127.0.0.1:{port}" in err and "coordtok serve" in err
    with pytest.raises(SystemExit):
        main(["encode", str(tmp_path / "clip.mp4"), "-o", str(tmp_path / "t.npz"), "--server", "ftp://127.0.0.1"])
    assert "expected the server's URL, e.g. http://localhost:8000" in capsys.readouterr().err


@pytest.mark.parametrize("options, says", [(["-n", "0"], "-n/--num-videos must be greater than or equal to 1, not 0"),
                                           (["--steps", "0"], "--steps must be"), (["--guidance", "500"], "--guidance must be")])
def test_generate_checks_its_options_before_it_makes_anything(options, says, tmp_path, capsys):
    out = tmp_path / "g0"
    assert main(["generate", *options, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coordtok: error: ") and says in err and "pydantic" not in err
    assert not out.exists()


def test_every_argument_has_help_and_every_option_shows_its_default():
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            assert action.help, (name, action.dest)
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in text, (name, action.dest)
    assert {"--start", "--end"} <= set(commands["encode"]._option_string_actions)
    assert "--restore-size" in commands["decode"]._option_string_actions


def serve(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordtok.service.cli", "serve", "--host", "127.0.0.1", *options],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "COORDTOK_DEVICES": '["cpu"]',
                               "COORDTOK_GENERATOR": "none"})


def test_serve_on_a_busy_port_fails_at_once_in_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # The port is checked before the model loads: a missing model file is not what it reports.
        result = serve("--port", str(port), "--model", str(tmp_path / "missing.safetensors"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"coordtok: error: port {port} on 127.0.0.1 is in use (another server?): stop it, or pass another --port"]


def test_a_damaged_model_is_one_line_and_its_traceback_is_at_debug_level(tmp_path):
    (tmp_path / "damaged.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    quiet = serve("--port", "0", "--model", str(tmp_path / "damaged.safetensors"))
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    errors = [line for line in quiet.stderr.splitlines() if '"level": "error"' in line or "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("coordtok: error: cannot load the model"), quiet.stderr
    verbose = serve("--port", "0", "--model", str(tmp_path / "damaged.safetensors"), "--log-level", "debug")
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
