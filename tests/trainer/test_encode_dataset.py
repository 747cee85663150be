"""Dataset tokenization (`coordtok encode-dataset`): every clip encoded as the service cuts it, the
same shards from one process, two gloo processes, a stopped run resumed and a killed one resumed;
unreadable files listed; the generator trains from the shards."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from coordtok.formats.video import read_frames
from coordtok.model import CoordTok, CoordTokConfig, load_model
from coordtok.model.checkpoint import save_model
from coordtok.model.clips import ClipLayout
from coordtok.model.triplane import from_uint8
from coordtok.service.model_setting import model_identity
from coordtok.service.cli import main as coordtok
from coordtok.trainer import distributed, token_shards
from coordtok.trainer.encode_dataset import EncodeOptions, Tokenizer, encode_dataset
from coordtok.trainer.generator import main as train_generator
from coordtok.trainer.token_shards import read_header, read_manifest, read_planes, shard_path

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = CoordTokConfig(
    frames=16, height=32, width=32, enc_patch_t=4, enc_patch_xy=8, enc_dim=32, enc_heads=2, enc_vit_layers=1,
    enc_cross_layers=1, latent_res_xy=8, latent_res_t=8, latent_channels=4, latent_patch_xy=4, latent_patch_t=4,
    dec_dim=32, dec_heads=2, dec_layers=1, dec_patch_xy=8, decode_slice_frames=4,
)
# (path under the root, frames, height, width, codec): sorted, shards of 2 are [0, 1], [2, 3], [4].
VIDEOS = [("ClassA/v_ClassA_g01_c01.mp4", 24, 40, 48, "libx264"), ("ClassA/v_ClassA_g02_c01.avi", 10, 36, 36, "mpeg4"),
          ("ClassB/broken.mp4", 0, 0, 0, ""), ("ClassB/v_ClassB_g01_c01.mkv", 30, 48, 40, "libx264"),
          ("ClassC/v_ClassC_g01_c01.mp4", 40, 32, 32, "libx264")]
OPTIONS = EncodeOptions(shard_size=2, batch=3, workers=0, progress=False)
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/trainer/conftest.py


def write_video(path: Path, frames: np.ndarray, fps: int, codec: str) -> None:
    """uint8 frames [T, H, W, 3] -> a video file, with PyAV."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width, stream.pix_fmt = *frames.shape[1:3], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """UCF-101-like class folders of moving gradients in three containers, a file that is no video,
    and files the listing leaves out (a macOS resource fork, a text file)."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for i, (name, frames, h, w, codec) in enumerate(VIDEOS):
        (root / name).parent.mkdir(exist_ok=True)
        if not frames:
            (root / name).write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
            continue
        t, y, x = np.arange(frames)[:, None, None, None], np.arange(h)[None, :, None, None], np.arange(w)[None, None, :, None]
        clip = 127 + 100 * np.sin(0.2 * x * rng.uniform(0.5, 1.5, size=3) + 0.15 * y - 0.3 * t + i)
        write_video(root / name, clip.clip(0, 255).astype(np.uint8), fps=10, codec=codec)
    (root / "ClassA" / "._v_ClassA_g01_c01.mp4").write_bytes(b"\0" * 100)
    (root / "notes.txt").write_text("not a video")
    return root


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.safetensors"
    save_model(CoordTok(TOKENIZER), path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_file) -> Tokenizer:
    """The model of `coordtok encode-dataset --model tokenizer_file`, named as the command names it."""
    return Tokenizer(load_model(tokenizer_file, device="cpu"), *model_identity(str(tokenizer_file)))


def single_process() -> distributed.Distributed:
    return distributed.Distributed(rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def reference(videos, tokenizer, tmp_path_factory) -> Path:
    """The shards of one uninterrupted run in one process."""
    out = tmp_path_factory.mktemp("reference")
    summary = encode_dataset(videos, out, tokenizer, OPTIONS, single_process())
    assert (summary.shards, summary.written, summary.found, summary.unreadable, summary.complete) == (3, 3, 0, 1, True)
    return out


def assert_same_shards(out: Path, expected: Path) -> None:
    """The shards of `out` hold the tokens, sources, settings and manifest rows of `expected`'s,
    bit for bit (the files' bytes may differ: safetensors writes the header's keys in any order)."""
    names = sorted(path.name for path in expected.glob("shard-*.safetensors"))
    assert sorted(path.name for path in out.glob("shard-*.safetensors")) == names
    for name in names:
        for a, b in zip(read_planes(out / name).planes(), read_planes(expected / name).planes()):
            assert torch.equal(a, b), name
        assert read_header(out / name) == read_header(expected / name), name


def test_every_clip_holds_the_tokens_of_the_clip_the_service_cuts(reference, videos, tokenizer):
    """Each manifest row names a clip of its video as /v1/encode cuts it, and the shard's row of
    that index holds the model's encoding of that clip."""
    rows = [row for row in read_manifest(reference) if "index" in row]
    assert sorted({row["source"] for row in rows}) == [name for name, frames, *_ in VIDEOS if frames]
    model = tokenizer.model
    for name, frames, h, w, _ in [v for v in VIDEOS if v[1]]:
        decoded, info, _ = read_frames(videos / name, size=(32, 32), resize="crop")
        layout = ClipLayout.plan(len(decoded), 16, "stretch")
        with torch.inference_mode():
            expected = model.encode(from_uint8(layout.cut(torch.from_numpy(decoded))), layout.model_n_frames())
        mine = [row for row in rows if row["source"] == name]
        assert [row["frames"] for row in mine] == [[s, s + n] for s, n in zip(layout.starts, layout.lengths)]
        assert {(row["clips"], row["fps"], tuple(row["source_size"]), row["model_id"], row["weights_sha256"])
                for row in mine} == {(layout.clips, 10.0, (h, w), tokenizer.model_id, tokenizer.weights_sha256)}
        for row, k in zip(mine, range(layout.clips)):
            got = read_planes(shard_path(reference, row["shard"]))[row["index"]]
            for a, b in zip(got.planes(), expected[k].planes()):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_an_unreadable_video_is_listed_with_the_reason_and_its_shard_still_written(reference):
    errors = [row for row in read_manifest(reference) if "error" in row]
    assert [(row["source"], row["shard"]) for row in errors] == [("ClassB/broken.mp4", 1)]
    assert "not a video" in errors[0]["error"]
    spec, rows = read_header(shard_path(reference, 1))
    assert spec.sources == ("ClassB/broken.mp4", "ClassB/v_ClassB_g01_c01.mkv")
    assert read_planes(shard_path(reference, 1)).batch_size == len([row for row in rows if "index" in row]) == 2


def test_two_gloo_processes_write_the_shards_of_one(reference, videos, tokenizer_file, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "coordtok.service.cli", "encode-dataset", str(videos), "-o", str(tmp_path), "--model",
               str(tokenizer_file), "--shard-size", "2", "--batch", "3", "--workers", "1"]
    result = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_shards(tmp_path, reference)
    assert read_manifest(tmp_path) == read_manifest(reference)


def test_a_stopped_run_continues_to_the_shards_of_an_uninterrupted_one(reference, videos, tokenizer, tmp_path):
    first = encode_dataset(videos, tmp_path, tokenizer, EncodeOptions(**{**vars(OPTIONS), "max_shards": 1}), single_process())
    assert (first.written, first.complete) == (1, False)
    assert not (tmp_path / token_shards.MANIFEST).exists()
    with pytest.raises(ValueError, match="not every shard"):
        token_shards.training_clips(tmp_path, tokenizer.weights_sha256)
    (tmp_path / "shard-00001.safetensors.tmp").write_bytes(b"what a killed write leaves")
    second = encode_dataset(videos, tmp_path, tokenizer, OPTIONS, single_process())
    assert (second.found, second.written, second.complete) == (1, 2, True)
    assert_same_shards(tmp_path, reference)
    assert read_manifest(tmp_path) == read_manifest(reference)


def test_a_killed_run_leaves_whole_shards_and_resumes_to_the_same_ones(reference, videos, tokenizer, tokenizer_file,
                                                                      tmp_path):
    command = [sys.executable, "-m", "coordtok.service.cli", "encode-dataset", str(videos), "-o", str(tmp_path),
               "--model", str(tokenizer_file), "--shard-size", "2", "--batch", "3", "--workers", "0"]
    process = subprocess.Popen(command, env=SUBPROCESS_ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not shard_path(tmp_path, 0).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert shard_path(tmp_path, 0).exists()
    for path in tmp_path.glob("shard-*.safetensors"):
        read_header(path)  # whole: the kill lands before a rename or after it
    summary = encode_dataset(videos, tmp_path, tokenizer, OPTIONS, single_process())
    assert summary.complete and summary.found >= 1
    assert_same_shards(tmp_path, reference)


def test_a_folder_of_other_settings_files_or_damaged_shards_is_refused(reference, videos, tokenizer, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    with pytest.raises(ValueError, match="other settings .*fps None then, 5.0 now"):
        encode_dataset(videos, out, tokenizer, EncodeOptions(**{**vars(OPTIONS), "fps": 5.0}), single_process())
    (videos / "ClassA" / "v_ClassA_g00_c01.mp4").symlink_to(videos / VIDEOS[0][0])
    try:
        with pytest.raises(ValueError, match="other files"):
            encode_dataset(videos, out, tokenizer, OPTIONS, single_process())
    finally:
        (videos / "ClassA" / "v_ClassA_g00_c01.mp4").unlink()
    damaged = shard_path(out, 2)
    damaged.write_bytes(shard_path(reference, 2).read_bytes()[:100])
    with pytest.raises(ValueError, match="shard-00002.safetensors is not a whole token shard"):
        encode_dataset(videos, out, tokenizer, OPTIONS, single_process())


def test_bad_options_are_refused_before_the_model_loads(videos, tmp_path, capsys):
    assert coordtok(["encode-dataset", str(videos), "-o", str(tmp_path), "--fps", "0"]) == 2
    assert "--fps is 0 fps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        coordtok(["encode-dataset", str(videos), "-o", str(tmp_path), "--max-duration", "nan"])
    assert "--max-duration: must be a number above 0, not nan" in capsys.readouterr().err


def test_videos_over_the_frame_limit_given_are_listed_as_unreadable_and_the_rest_encoded(videos, tokenizer_file, tmp_path):
    """--max-frames 25 refuses the 30- and 40-frame videos (the limit crossed named in the manifest)."""
    out = tmp_path / "tokens"
    assert coordtok(["encode-dataset", str(videos), "-o", str(out), "--model", str(tokenizer_file), "--workers", "0",
                     "--max-frames", "25"]) == 0
    rows = read_manifest(out)
    refused = {row["source"]: row["error"] for row in rows if "error" in row}
    assert sorted(refused) == ["ClassB/broken.mp4", "ClassB/v_ClassB_g01_c01.mkv", "ClassC/v_ClassC_g01_c01.mp4"]
    assert all("over the limit of 25" in refused[name] for name in sorted(refused)[1:])
    assert sorted({row["source"] for row in rows if "index" in row}) == ["ClassA/v_ClassA_g01_c01.mp4",
                                                                        "ClassA/v_ClassA_g02_c01.avi"]


def test_the_generator_trains_from_the_shards(reference, tokenizer_file, tmp_path):
    run_dir = tmp_path / "run"
    assert train_generator(["--tokenizer", str(tokenizer_file), "--tokens", str(reference), "--conditional",
                            "--run-dir", str(run_dir), "--model-overrides", json.dumps({"dim": 64, "depth": 2, "heads": 2}),
                            "--batch-size", "4", "--steps", "3", "--warmup-steps", "1", "--log-every", "1",
                            "--ckpt-every", "3"]) == 0
    record = json.loads((run_dir / "config.json").read_text())
    assert record["classes"] == ["ClassA", "ClassB", "ClassC"]
    assert record["clips"] == len([row for row in read_manifest(reference) if "index" in row])
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    assert (run_dir / "export.safetensors").is_file()
