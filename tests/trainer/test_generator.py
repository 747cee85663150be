"""The generator trainer: the loss falls, resume is exact, latents are cached, token files and
class folders work, and the export loads and generates triplanes the tokenizer decodes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from coordtok.model import CoordTok, CoordTokConfig, LatentStats, SiT, generate_triplanes, load_generator, load_model
from coordtok.model.checkpoint import file_sha256, read_metadata, save_model
from coordtok.model.generate import flatten, unflatten
from coordtok.formats.video_write import write_video
from coordtok.trainer import distributed
from coordtok.trainer.checkpoint import latest_checkpoint, load_checkpoint
from coordtok.trainer.data import VideoClips, list_videos
from coordtok.trainer.export import export_model
from coordtok.trainer.generator import GeneratorTrainer, main
from coordtok.trainer.generator_config import GeneratorConfig

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = CoordTokConfig(
    frames=16, height=32, width=32, enc_patch_t=4, enc_patch_xy=8, enc_dim=32, enc_heads=2, enc_vit_layers=1,
    enc_cross_layers=1, latent_res_xy=8, latent_res_t=8, latent_channels=4, latent_patch_xy=4, latent_patch_t=4,
    dec_dim=32, dec_heads=2, dec_layers=1, dec_patch_xy=8, decode_slice_frames=4,
)
SMALL_SIT = {"dim": 64, "depth": 2, "heads": 2}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/trainer/conftest.py


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Three small video files in two class folders: moving gradients of different sizes and lengths."""
    folder = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for i, (name, frames, h, w) in enumerate([("a/clip0", 24, 40, 48), ("a/clip1", 30, 36, 36), ("b/clip2", 10, 48, 40)]):
        t = np.arange(frames)[:, None, None, None]
        y = np.arange(h)[None, :, None, None]
        x = np.arange(w)[None, None, :, None]
        clip = 127 + 100 * np.sin(0.2 * x * rng.uniform(0.5, 1.5, size=3) + 0.15 * y - 0.3 * t + i)
        (folder / name).parent.mkdir(exist_ok=True)
        write_video(clip.clip(0, 255).astype(np.uint8), folder / f"{name}.mp4", fps=10)
    return folder


@pytest.fixture(scope="module")
def tokenizer(videos, tmp_path_factory) -> Path:
    """A small random-weight tokenizer exported with its latent stats, as trainer.tokenizer does."""
    torch.manual_seed(0)
    model = CoordTok(TOKENIZER)
    clips = VideoClips(list_videos(videos), frames=16, height=32, width=32)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.safetensors"
    export_model(model, clips, path, clips=3)
    return path


def config(tokenizer: Path, videos: Path, run_dir: Path, **overrides) -> GeneratorConfig:
    values = dict(tokenizer=str(tokenizer), videos=str(videos), run_dir=str(run_dir), model_overrides=SMALL_SIT,
                  batch_size=4, steps=40, lr=2e-3, min_lr=2e-3, warmup_steps=1, ema_decay=0.9, clips_per_video=4,
                  workers=0, log_every=1, ckpt_every=10, seed=1)
    values.update(overrides)
    return GeneratorConfig(**values)


def single_process() -> distributed.Distributed:
    return distributed.Distributed(rank=0, world_size=1, device=torch.device("cpu"))


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_exports_a_generator_for_its_tokenizer(tokenizer, videos, tmp_path):
    trainer = GeneratorTrainer(config(tokenizer, videos, tmp_path), single_process())
    assert trainer.latents.shape == (12, 3 * 8 * 8 * 4) and trainer.classes == []
    # Normalised with the tokenizer's stats: about zero mean and unit variance per channel.
    assert abs(trainer.latents.mean().item()) < 0.2 and 0.7 < trainer.latents.std().item() < 1.3
    trainer.run()
    curve = losses(tmp_path)
    assert len(curve) == 40 and np.mean(curve[-8:]) < 0.8 * np.mean(curve[:8])
    assert len(list((tmp_path / "checkpoints").glob("step_*.pt"))) == 3
    run = json.loads((tmp_path / "config.json").read_text())
    assert run["tokenizer_sha256"] == file_sha256(tokenizer) and run["clips"] == 12

    generator, metadata = load_generator(tmp_path / "export.safetensors", device="cpu",
                                         tokenizer_sha256=file_sha256(tokenizer))
    assert metadata["steps"] == "40" and metadata["latent_stats"] == LatentStats.from_json(
        read_metadata(tokenizer)["latent_stats"]).to_json()
    ema = SiT(trainer.model_config)
    trainer.ema.copy_to(ema)
    x, t = unflatten(trainer.latents[:2], ema.config.plane_shapes), torch.tensor([0.2, 0.8])
    with torch.no_grad():
        assert generator(x, t).xy.equal(ema(x, t).xy)  # the export holds the EMA weights
    stats = LatentStats.from_json(metadata["latent_stats"])
    triplane = generate_triplanes(generator, stats, num=2, steps=4, seed=3)
    video = load_model(tokenizer, device="cpu").decode_video(triplane, frames=(0, 4))
    assert video.shape == (2, 4, 32, 32, 3) and bool(torch.isfinite(video).all())


def test_resume_gives_the_same_next_step_loss(tokenizer, videos, tmp_path):
    cfg = config(tokenizer, videos, tmp_path, steps=8)
    uninterrupted = GeneratorTrainer(cfg, single_process())
    batches = uninterrupted.batches()
    reference = [uninterrupted.train_step(batches) for _ in range(5)]  # 3 batches an epoch: crosses one

    first = GeneratorTrainer(cfg, single_process())
    batches = first.batches()
    for _ in range(3):
        first.train_step(batches)
    torch.save(first.state(), tmp_path / "state.pt")
    torch.manual_seed(1234)  # the restore must not depend on the process's RNG state

    resumed = GeneratorTrainer(cfg, single_process())
    resumed.restore(torch.load(tmp_path / "state.pt", weights_only=True))
    batches = resumed.batches()
    assert [resumed.train_step(batches) for _ in range(2)] == pytest.approx(reference[3:], rel=1e-6, abs=1e-7)
    for name, value in resumed.ema.state_dict().items():
        torch.testing.assert_close(value, uninterrupted.ema.state_dict()[name], rtol=1e-5, atol=1e-6)


def test_cli_resume_reads_the_cached_latents(tokenizer, videos, tmp_path):
    args = ["--tokenizer", str(tokenizer), "--videos", str(videos), "--run-dir", str(tmp_path),
            "--model-overrides", json.dumps(SMALL_SIT), "--batch-size", "2", "--workers", "0", "--ckpt-every", "2",
            "--log-every", "1"]
    assert main(args + ["--steps", "3"]) == 0
    (share,) = (tmp_path / "latents").glob("*/0-of-1.safetensors")
    written = share.stat().st_mtime_ns
    latest_checkpoint(tmp_path).unlink()  # as if killed after logging step 3, before its checkpoint
    assert main(args + ["--steps", "4", "--resume"]) == 0
    assert share.stat().st_mtime_ns == written
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 4
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    with pytest.raises(SystemExit):
        main(args + ["--tokens", str(tmp_path)])  # videos and tokens at once


def test_token_files_of_the_server_train_like_their_videos(tokenizer, videos, tmp_path):
    from_videos = GeneratorTrainer(config(tokenizer, videos, tmp_path / "v", clips_per_video=1, batch_size=3),
                                   single_process())
    model = load_model(tokenizer, device="cpu")
    folder = tmp_path / "tokens"
    folder.mkdir()
    clips = VideoClips(list_videos(videos), frames=16, height=32, width=32, seed=1)
    for i in range(len(clips)):
        video, n = clips[i]
        with torch.no_grad():
            planes = model.encode(video[None], torch.tensor([n])).planes()
        save_file(dict(zip(("xy", "yt", "xt"), planes)), folder / f"clip{i}.safetensors",
                  metadata={"weights_sha256": file_sha256(tokenizer), "n_frames": json.dumps([n])})
    from_tokens = GeneratorTrainer(config(tokenizer, "", tmp_path / "t", tokens=str(folder), batch_size=3),
                                   single_process())
    torch.testing.assert_close(from_tokens.latents, from_videos.latents, rtol=1e-5, atol=1e-5)

    save_file(dict(zip(("xy", "yt", "xt"), planes)), folder / "other.safetensors", metadata={"weights_sha256": "0" * 64})
    with pytest.raises(ValueError, match="not of the tokenizer"):
        GeneratorTrainer(config(tokenizer, "", tmp_path / "t", tokens=str(folder), batch_size=3), single_process())


def test_class_folders_give_a_class_conditional_generator(tokenizer, videos, tmp_path):
    trainer = GeneratorTrainer(config(tokenizer, videos, tmp_path, conditional=True, steps=2), single_process())
    assert trainer.classes == ["a", "b"] and trainer.model_config.num_classes == 2
    assert trainer.labels.tolist() == [0] * 8 + [1] * 4  # 4 clips of each of a's 2 videos, then b's
    trainer.run()
    generator, metadata = load_generator(tmp_path / "export.safetensors", device="cpu")
    assert json.loads(metadata["classes"]) == ["a", "b"]
    out = generate_triplanes(generator, LatentStats.from_json(metadata["latent_stats"]), num=1, steps=2, label=1,
                             guidance=2.0)
    assert flatten(out).shape == (1, 3 * 8 * 8 * 4)


def test_a_tokenizer_without_latent_stats_gets_them_measured_on_the_clips(tokenizer, videos, tmp_path):
    bare = tmp_path / "bare.safetensors"
    save_model(load_model(tokenizer, device="cpu"), bare)
    trainer = GeneratorTrainer(config(bare, videos, tmp_path / "run"), single_process())
    for plane in unflatten(trainer.latents, trainer.model_config.plane_shapes).planes():
        cells = plane.flatten(0, 2)  # [N * R0 * R1, C]
        torch.testing.assert_close(cells.mean(0), torch.zeros(4), rtol=0, atol=1e-4)
        torch.testing.assert_close(cells.std(0, correction=0), torch.ones(4), rtol=0, atol=1e-4)

def test_two_process_gloo_ddp_run(tokenizer, videos, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "coordtok.trainer.generator", "--tokenizer", str(tokenizer), "--videos", str(videos),
               "--run-dir", str(tmp_path), "--model-overrides", json.dumps(SMALL_SIT), "--batch-size", "2",
               "--steps", "3", "--workers", "0", "--clips-per-video", "2", "--log-every", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "latents").glob("*/*.safetensors")) == ["0-of-2.safetensors",
                                                                                      "1-of-2.safetensors"]
    assert len(losses(tmp_path)) == 3 and (tmp_path / "export.safetensors").is_file()
