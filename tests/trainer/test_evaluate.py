"""trainer.evaluate on a tiny random model and small generated videos."""
import hashlib
import json
import math

import numpy as np
import pytest
import torch

from coordtok.model import CoordTok, CoordTokConfig, save_model
from coordtok.model.clips import ClipLayout
from coordtok.formats.video import MediaLimits, read_frames
from coordtok.formats.video_write import write_video
from coordtok.trainer import evaluate as ev
from coordtok.trainer.lpips import LPIPS
from coordtok.trainer.metrics import psnr, trilinear_baseline

TINY = CoordTokConfig(
    frames=8, height=32, width=32,
    enc_dim=32, enc_heads=2, enc_patch_t=4, enc_patch_xy=16, enc_vit_layers=1, enc_cross_layers=1,
    latent_res_xy=8, latent_res_t=8, latent_channels=4, latent_patch_xy=4, latent_patch_t=4,
    dec_dim=32, dec_heads=2, dec_layers=1, dec_patch_t=1, dec_patch_xy=8, decode_slice_frames=4,
)
BUDGET = TINY.tokens * TINY.latent_channels  # (8*8 + 2*8*8) * 4 = 768 floats
VIDEO_FRAMES = {"a.mp4": 20, "nested/b.mp4": 8}  # 3 clips (at frames 0, 8 and 12: full clips) and 1 clip


def moving_gradient(frames: int, height: int = 40, width: int = 48) -> np.ndarray:
    """A smooth pattern drifting right: uint8 [T, H, W, 3]."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    red = 128 + 100 * np.sin((x + 2 * t) / 6)
    green = 128 + 100 * np.cos(y / 5)
    blue = np.full_like(red, 90.0)
    return np.stack([red, green, blue], axis=-1).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for name, frames in VIDEO_FRAMES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_video(moving_gradient(frames), root / name, fps=10)
    return root


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(CoordTok(TINY), path)
    return path


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lpips") / "lpips.safetensors"
    LPIPS().save(path)
    return path


def run_cli(tmp_path, *args: str) -> dict:
    out = tmp_path / "eval.json"
    ev.main([*args, "--json", str(out), "--device", "cpu"])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def result(videos, model_file, tmp_path_factory):
    return run_cli(tmp_path_factory.mktemp("out"), "--model", str(model_file), "--videos", str(videos), "--batch", "2")


def test_json_lists_every_clip_of_every_video(result, videos):
    rows = result["clips"]
    assert [(r["video"], r["clip"], r["start_frame"], r["n_frames"]) for r in rows] == [
        (str(videos / "a.mp4"), 0, 0, 8), (str(videos / "a.mp4"), 1, 8, 4), (str(videos / "a.mp4"), 2, 12, 8),
        (str(videos / "nested/b.mp4"), 0, 0, 8),
    ]
    assert [v["clips"] for v in result["videos"]] == [3, 1]
    assert result["skipped"] == []


def test_json_names_the_model_file_and_its_hash(result, model_file):
    assert result["model"] == {"path": str(model_file.resolve()), "sha256": hashlib.sha256(model_file.read_bytes()).hexdigest()}
    assert CoordTokConfig(**result["config"]) == TINY


def test_every_metric_is_finite_for_both_methods(result):
    for row in result["clips"] + result["videos"] + [result["mean"]]:
        for method in ev.METHODS:
            scores = row[method]
            assert set(scores) >= {"psnr", "ssim"}
            values = [v for k, v in scores.items() if k != "last4"] + scores.get("last4", [])
            assert all(math.isfinite(v) for v in values), scores
    assert all(len(row[m]["last4"]) == 4 for row in result["clips"] for m in ev.METHODS)


def test_mean_is_the_mean_over_clips(result):
    for method in ev.METHODS:
        expected = np.mean([r[method]["psnr"] for r in result["clips"]])
        assert result["mean"][method]["psnr"] == pytest.approx(expected)


def test_baseline_runs_at_the_models_float_budget(result):
    assert result["budget_floats"] == BUDGET
    for grid in [result["baseline_grid"]] + [r["baseline_grid"] for r in result["clips"]]:
        assert 3 * math.prod(grid) <= BUDGET
    # Every clip holds a full clip's frames (the last one overlaps), so each baseline has the full grid.
    assert all(r["baseline_grid"] == result["baseline_grid"] for r in result["clips"][:3])


def test_baseline_psnr_matches_a_recomputation(result, videos):
    """The baseline compresses the frames a clip holds and is scored on those the video takes from it."""
    frames, _, _ = read_frames(videos / "a.mp4", size=(TINY.height, TINY.width), resize="crop")
    layout = ClipLayout.plan(len(frames), TINY.frames, "stretch")
    for k, row in enumerate(result["clips"][:3]):
        held = torch.from_numpy(frames[layout.starts[k] : layout.starts[k] + layout.lengths[k]]).float()[None] / 127.5 - 1
        restored, grid = trilinear_baseline(held, BUDGET)
        kept = slice(row["start_frame"] - layout.starts[k], row["start_frame"] - layout.starts[k] + row["n_frames"])
        assert list(grid) == row["baseline_grid"]
        assert row["baseline"]["psnr"] == pytest.approx(psnr(restored[:, kept], held[:, kept]).item(), rel=1e-5)


def test_pad_policy_scores_the_real_frames_of_a_padded_last_clip(videos, model_file, tmp_path):
    out = run_cli(tmp_path, "--model", str(model_file), "--videos", str(videos / "nested/.."), "--clip-policy", "pad")
    rows = [(r["clip"], r["start_frame"], r["n_frames"]) for r in out["clips"] if r["video"].endswith("a.mp4")]
    assert rows == [(0, 0, 8), (1, 8, 8), (2, 16, 4)]
    assert out["clips"][2]["baseline_grid"][0] <= 4


def test_lpips_weights_reach_the_scores(videos, model_file, lpips_file, tmp_path):
    # LPIPS-VGG16 is slow on a CPU, so one clip is enough to follow the weights through.
    out = run_cli(tmp_path, "--model", str(model_file), "--videos", str(videos), "--max-clips", "1",
                  "--lpips-weights", str(lpips_file))
    assert out["lpips"] == "computed" and len(out["clips"]) == 1
    for method in ev.METHODS:
        assert math.isfinite(out["clips"][0][method]["lpips"])


def test_cvvdp_is_reported_either_way(result):
    assert result["cvvdp"].startswith(("computed", "not computed"))


def test_evaluate_stops_at_max_clips_and_skips_unreadable_files(videos, model_file, tmp_path):
    model = ev.load_model(str(model_file), device="cpu")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    out = ev.evaluate(model, [broken, videos / "a.mp4", videos / "nested/b.mp4"], max_clips=2)
    assert [r["clip"] for r in out["clips"]] == [0, 1]
    assert out["skipped"][0]["video"] == str(broken)
    assert "lpips" not in out["mean"]["coordtok"] and out["lpips"].startswith("not computed")


def test_lpips_flags_are_checked(videos, model_file, lpips_file, capsys):
    with pytest.raises(SystemExit):
        ev.main(["--model", str(model_file), "--videos", str(videos), "--lpips-backbone", str(lpips_file)])
    assert "go together" in capsys.readouterr().err


def test_table_has_a_row_per_video_and_the_mean(result):
    lines = ev.format_table(result).splitlines()
    assert len(lines) == 2 + len(result["videos"]) + 1
    assert lines[-1].startswith("mean") and "psnr coordtok" in lines[0]


def test_evaluate_with_refinement_scores_the_decoder_higher(videos, model_file, result, tmp_path):
    refined = run_cli(tmp_path, "--model", str(model_file), "--videos", str(videos), "--batch", "2", "--refine-steps", "30")
    assert (result["refine_steps"], refined["refine_steps"]) == (0, 30)
    assert refined["mean"]["coordtok"]["psnr"] > result["mean"]["coordtok"]["psnr"] + 0.1  # random decoder: +0.16 dB
    assert refined["mean"]["baseline"] == result["mean"]["baseline"]


def test_negative_refinement_steps_are_refused(videos, model_file, capsys):
    with pytest.raises(SystemExit):
        ev.main(["--model", str(model_file), "--videos", str(videos), "--refine-steps", "-1"])
    assert "--refine-steps must be 0 or more" in capsys.readouterr().err


def test_a_video_too_long_to_read_whole_is_scored_on_its_first_max_frames(videos, model_file):
    """a.mp4 (20 frames, 2 s) is over limits of 1 s and 10 frames: refused whole, and scored on
    its first 8 frames when only those are asked for (decoding stops there)."""
    model = ev.load_model(str(model_file), device="cpu")
    short = MediaLimits(max_duration_s=1.0, max_frames=10)
    whole = ev.evaluate(model, [videos / "a.mp4"], limits=short)
    assert whole["clips"] == [] and "over the limit of 1 s" in whole["skipped"][0]["error"]
    first = ev.evaluate(model, [videos / "a.mp4"], limits=short, max_frames=8)
    assert first["skipped"] == [] and [(r["start_frame"], r["n_frames"]) for r in first["clips"]] == [(0, 8)]


def test_max_frames_below_one_is_refused(videos, model_file, capsys):
    with pytest.raises(SystemExit):
        ev.main(["--model", str(model_file), "--videos", str(videos), "--max-frames", "0"])
    assert "--max-frames must be 1 or more" in capsys.readouterr().err
