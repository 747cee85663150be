"""The tokenizer trainer: losses fall, resume is exact, DDP runs, exports load and reconstruct."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coordtok.model import load_model
from coordtok.model.triplane import PLANES
from coordtok.formats.video_write import write_video
from coordtok.trainer import distributed
from coordtok.trainer.checkpoint import latest_checkpoint, load_checkpoint
from coordtok.trainer.config import TrainConfig
from coordtok.trainer.tokenizer import Trainer, main

ROOT = Path(__file__).resolve().parents[2]
SMALL_MODEL = {
    "frames": 16, "height": 32, "width": 32, "enc_patch_t": 4, "enc_patch_xy": 8,
    "enc_dim": 32, "enc_heads": 2, "enc_vit_layers": 1, "enc_cross_layers": 1,
    "latent_res_xy": 8, "latent_res_t": 8, "latent_channels": 4, "latent_patch_xy": 4, "latent_patch_t": 4,
    "dec_dim": 32, "dec_heads": 2, "dec_layers": 2, "dec_patch_xy": 4, "decode_slice_frames": 4,
    # The paper's per-patch position table learns the first steps' position-dependent colour fastest,
    # which these 40-step tests rely on; coordtok-tiny's factorised table is trained in test_codec_init.
    "dec_pos_embed": "full",
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Three small real video files: moving gradients of different sizes and lengths."""
    folder = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for i, (frames, h, w) in enumerate([(24, 40, 48), (30, 36, 36), (10, 48, 40)]):  # the last is short
        t = np.arange(frames)[:, None, None, None]
        y = np.arange(h)[None, :, None, None]
        x = np.arange(w)[None, None, :, None]
        colour = rng.uniform(0.5, 1.5, size=3)
        clip = 127 + 100 * np.sin(0.2 * x * colour + 0.15 * y - 0.3 * t + i)
        write_video(clip.clip(0, 255).astype(np.uint8), folder / f"clip{i}.mp4", fps=10)
    return folder


def config(videos: Path, run_dir: Path, **overrides) -> TrainConfig:
    values = dict(model="coordtok-tiny", model_overrides=SMALL_MODEL, videos=str(videos), run_dir=str(run_dir),
                  batch_size=2, steps=40, lr=1e-3, min_lr=1e-3, warmup_steps=1, points=64, workers=0,
                  cache=True, clips_per_video=2, log_every=1, ckpt_every=10, seed=1)
    values.update(overrides)
    return TrainConfig(**values)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def single_process() -> distributed.Distributed:
    return distributed.Distributed(rank=0, world_size=1, device=torch.device("cpu"))


def test_stage1_lowers_the_loss_and_exports(videos, tmp_path):
    Trainer(config(videos, tmp_path), single_process()).run()
    curve = losses(tmp_path)
    assert len(curve) == 40
    assert np.mean(curve[-5:]) < 0.95 * np.mean(curve[:5])
    run = json.loads((tmp_path / "config.json").read_text())
    assert run["train"]["steps"] == 40 and len(run["git_commit"]) >= 7
    assert len(list((tmp_path / "checkpoints").glob("step_*.pt"))) == 3  # keep_last


def test_export_loads_and_reconstructs(videos, tmp_path):
    trainer = Trainer(config(videos, tmp_path, steps=5), single_process())
    trainer.run()
    exported = load_model(tmp_path / "export.safetensors", device="cpu")
    video, n = trainer.dataset[0]
    with torch.no_grad():
        trainer.model.eval()
        expected = trainer.model.decode_video(trainer.model.encode(video[None], torch.tensor([n])))
        actual = exported.decode_video(exported.encode(video[None], torch.tensor([n])))
    torch.testing.assert_close(actual, expected)
    from coordtok.model.checkpoint import read_metadata

    stats = json.loads(read_metadata(tmp_path / "export.safetensors")["latent_stats"])
    assert set(stats) == set(PLANES)
    assert all(len(stats[p]["std"]) == 4 and min(stats[p]["std"]) > 0 for p in PLANES)


def test_stage2_from_a_stage1_export_lowers_the_loss(videos, tmp_path):
    Trainer(config(videos, tmp_path / "s1", steps=10), single_process()).run()
    stage2 = config(videos, tmp_path / "s2", model=str(tmp_path / "s1" / "export.safetensors"),
                    model_overrides={}, stage=2, steps=20)
    Trainer(stage2, single_process()).run()
    curve = losses(tmp_path / "s2")
    assert np.mean(curve[-5:]) < np.mean(curve[:5])


def test_freeze_encoder_keeps_the_tokens_and_their_stats(videos, tmp_path):
    Trainer(config(videos, tmp_path / "s1", steps=5), single_process()).run()
    start = tmp_path / "s1" / "export.safetensors"
    frozen = config(videos, tmp_path / "s2", model=str(start), model_overrides={}, stage=2, steps=8,
                    freeze_encoder=True, ema_decay=0.9)
    trainer = Trainer(frozen, single_process())
    trainer.run()
    before, after = load_model(start, device="cpu"), load_model(tmp_path / "s2" / "export.safetensors", device="cpu")
    video, n = trainer.dataset[0]
    with torch.no_grad():
        tokens_before = before.encode(video[None], torch.tensor([n]))
        tokens_after = after.encode(video[None], torch.tensor([n]))
    for plane_before, plane_after in zip(tokens_before.planes(), tokens_after.planes()):
        assert torch.equal(plane_before, plane_after)
    decoder_before, decoder_after = before.decoder.state_dict(), after.decoder.state_dict()
    assert any(not torch.equal(decoder_before[k], decoder_after[k]) for k in decoder_before)
    from coordtok.model.checkpoint import read_metadata

    assert read_metadata(tmp_path / "s2" / "export.safetensors")["latent_stats"] == read_metadata(start)["latent_stats"]


def test_freeze_encoder_needs_a_trained_model(videos, tmp_path):
    with pytest.raises(ValueError, match="freeze_encoder"):
        config(videos, tmp_path, freeze_encoder=True).validate()


def test_resume_gives_the_same_next_step_loss(videos, tmp_path):
    cfg = config(videos, tmp_path, steps=8, ema_decay=0.9)
    uninterrupted = Trainer(cfg, single_process())
    batches = uninterrupted.batches()
    reference = [uninterrupted.train_step(batches) for _ in range(5)]

    first = Trainer(cfg, single_process())
    batches = first.batches()
    for _ in range(3):
        first.train_step(batches)
    saved = first.state()
    torch.save(saved, tmp_path / "state.pt")  # through the file format, as a real resume
    torch.manual_seed(1234)  # the restore must not depend on the process's RNG state

    resumed = Trainer(cfg, single_process())
    resumed.restore(torch.load(tmp_path / "state.pt", weights_only=True))
    batches = resumed.batches()
    after = [resumed.train_step(batches) for _ in range(2)]
    assert after == pytest.approx(reference[3:], rel=1e-6, abs=1e-7)
    for name, value in resumed.ema.state_dict().items():
        torch.testing.assert_close(value, uninterrupted.ema.state_dict()[name], rtol=1e-5, atol=1e-6)
    assert resumed.step == uninterrupted.step == 5


def test_cli_resume_continues_from_the_last_checkpoint(videos, tmp_path):
    args = ["--videos", str(videos), "--run-dir", str(tmp_path), "--model-overrides", json.dumps(SMALL_MODEL),
            "--batch-size", "2", "--points", "32", "--workers", "0", "--cache", "--ckpt-every", "2",
            "--log-every", "1"]
    assert main(args + ["--steps", "3"]) == 0
    latest_checkpoint(tmp_path).unlink()  # as if killed after logging step 3, before its checkpoint
    assert main(args + ["--steps", "4", "--resume"]) == 0
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 4
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_two_process_gloo_ddp_run(videos, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "coordtok.trainer.tokenizer", "--videos", str(videos), "--run-dir", str(tmp_path),
               "--model-overrides", json.dumps(SMALL_MODEL), "--batch-size", "1", "--steps", "3",
               "--points", "32", "--workers", "0", "--cache", "--log-every", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "config.json").read_text())["world_size"] == 2
    assert len(losses(tmp_path)) == 3
    assert (tmp_path / "export.safetensors").is_file()


def test_worker_processes_give_the_same_batches_across_epochs(videos, tmp_path):
    """Persistent workers must follow the epoch: clips equal those of an in-process loader."""
    in_process = Trainer(config(videos, tmp_path / "a", workers=0), single_process()).batches()
    with_workers = Trainer(config(videos, tmp_path / "b", workers=1), single_process()).batches()
    for _ in range(5):  # 3 batches per epoch: crosses into epoch 1
        (video_a, n_a), (video_b, n_b) = next(in_process), next(with_workers)
        assert torch.equal(video_a, video_b) and torch.equal(n_a, n_b)


def test_what_the_set_up_refuses_is_one_line_and_exit_status_2(tmp_path, capsys):
    assert main(["--videos", str(tmp_path / "missing"), "--run-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"error: video folder not found: {tmp_path / 'missing'}\n"
    (tmp_path / "empty").mkdir()
    assert main(["--videos", str(tmp_path / "empty"), "--run-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
