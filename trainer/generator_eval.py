"""Do a generator's samples look like video? Measurements that run offline on a CPU.

    python -m coordtok.trainer.generator_eval --generator G.safetensors --tokenizer T.safetensors \\
        --train-videos DIR --heldout-videos DIR [--exclude NAME ...] [-n 16] [--steps 50] [--json OUT]

- Patch-boundary ratio (`boundary_ratio`): the mean absolute difference between horizontally or
  vertically neighbouring pixels that lie on the two sides of a decoder patch boundary (every
  `patch` pixels), divided by the same mean for neighbours inside a patch. A mosaic of unrelated
  patches scores well above 1; natural video near 1. Reported for the samples and for the
  tokenizer's reconstructions of real held-out clips (what the tokenizer itself produces).
- Frechet distance (`frechet_distance`) between Gaussians fitted to features of two sets of
  clips. Features (`latent_features`): the tokenizer's normalised triplane, each plane
  average-pooled to 4x4 cells per channel (xy 4x4, yt and xt 4x4: 384 values). Reference scale:
  the distance between training clips and held-out real clips.
- Copying: each sample's distance to its nearest training clip in the normalised latent space,
  against the same for held-out real clips (a generator that copies sits far below them).
- Motion (`temporal_change`): the mean absolute difference between consecutive frames, in
  [0, 1] pixel units; a static mosaic scores about zero.
- Speed: seconds per video of sampling plus decoding, against sampling steps.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from coordtok.model import CoordTok, LatentStats, SiT, Triplane, generate_triplanes, load_generator, load_model
from coordtok.model.checkpoint import file_sha256
from coordtok.model.clips import policy_for
from coordtok.model.generate import flatten
from coordtok.trainer.data import VideoClips, list_videos

POOLED_CELLS = 4


def boundary_ratio(video: torch.Tensor, patch: int) -> float:
    """video [B, T, H, W, 3] in [-1, 1] -> mean |difference| across patch boundaries / inside."""
    across, inside = [], []
    for axis in (2, 3):  # rows (x), columns (y)
        diff = (video.narrow(axis, 1, video.shape[axis] - 1) - video.narrow(axis, 0, video.shape[axis] - 1)).abs()
        on_boundary = (torch.arange(1, video.shape[axis]) % patch) == 0  # between pixel i-1 and i
        shape = [1] * video.dim()
        shape[axis] = -1
        mask = on_boundary.view(shape).expand_as(diff)
        across.append(diff[mask])
        inside.append(diff[~mask])
    return float(torch.cat(across).mean() / torch.cat(inside).mean().clamp(min=1e-12))


def temporal_change(video: torch.Tensor) -> float:
    """video [B, T, H, W, 3] in [-1, 1] -> mean |frame t+1 - frame t| on [0, 1] values."""
    return float((video[:, 1:] - video[:, :-1]).abs().mean() / 2)


def latent_features(triplane: Triplane, stats: LatentStats) -> torch.Tensor:
    """Normalised triplanes -> [B, F]: every plane average-pooled to 4x4 cells per channel."""
    pooled = [F.adaptive_avg_pool2d(p.permute(0, 3, 1, 2), POOLED_CELLS).flatten(1) for p in stats.normalise(triplane).planes()]
    return torch.cat(pooled, dim=1).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [N, F] and b [M, F]:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr((S_a S_b)^(1/2)) = sum of sqrt of the eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric PSD).
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * middle)


def nearest_distances(queries: torch.Tensor, references: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """Euclidean distance from each query [N, D] to its nearest reference [M, D] -> [N]."""
    distances = torch.cdist(queries.double(), references.double())
    if exclude_self:
        distances.fill_diagonal_(float("inf"))
    return distances.min(dim=1).values


def encode_clips(tokenizer: CoordTok, files: list[Path], clips_per_video: int, seed: int) -> tuple[Triplane, torch.Tensor]:
    """Random clips of `files` (the trainer's dataset rules) -> their triplanes and the clips
    [N, T, H, W, 3] in [-1, 1]."""
    c = tokenizer.config
    dataset = VideoClips(files, c.frames, c.height, c.width, clips_per_video=clips_per_video, seed=seed,
                         policy=policy_for(c.reference_compat))
    triplanes, videos = [], []
    with torch.inference_mode():
        for index in range(len(dataset)):
            video, n_frames = dataset[index]
            triplanes.append(tokenizer.encode(video[None], torch.tensor([n_frames])))
            videos.append(video[None])
    return Triplane.cat(triplanes), torch.cat(videos)


def measure(tokenizer: CoordTok, generator: SiT, stats: LatentStats, train: list[Path], heldout: list[Path],
            num: int, steps: int, seed: int = 0, clips_per_video: int = 4) -> dict:
    """Every measurement of the module docstring, as a dict."""
    patch = tokenizer.config.dec_patch_xy
    train_tri, _ = encode_clips(tokenizer, train, clips_per_video, seed)
    held_tri, held_videos = encode_clips(tokenizer, heldout, clips_per_video, seed + 1)
    began = time.perf_counter()
    with torch.inference_mode():
        samples = generate_triplanes(generator, stats, num=num, steps=steps, seed=seed)
        sampled = time.perf_counter()
        generated = tokenizer.decode_video(samples).float().clamp(-1, 1)
        decoded = time.perf_counter()
        reconstructed = torch.cat([tokenizer.decode_video(held_tri[i]).float().clamp(-1, 1)
                                   for i in range(held_tri.batch_size)])
    train_latent, held_latent, sample_latent = (flatten(stats.normalise(t)).double() for t in (train_tri, held_tri, samples))
    train_features, held_features, sample_features = (latent_features(t, stats) for t in (train_tri, held_tri, samples))
    return {
        "samples": num, "steps": steps, "train_clips": train_tri.batch_size, "heldout_clips": held_tri.batch_size,
        "boundary_ratio": {"generated": boundary_ratio(generated, patch), "reconstructed": boundary_ratio(reconstructed, patch),
                           "real": boundary_ratio(held_videos, patch)},
        "frechet": {"generated_vs_heldout": frechet_distance(sample_features, held_features),
                    "train_vs_heldout": frechet_distance(train_features, held_features)},
        "nearest_train_distance": {
            "generated_median": float(nearest_distances(sample_latent, train_latent).median()),
            "heldout_median": float(nearest_distances(held_latent, train_latent).median()),
        },
        "temporal_change": {"generated": temporal_change(generated), "reconstructed": temporal_change(reconstructed),
                            "real": temporal_change(held_videos)},
        "seconds_per_video": {"sampling": (sampled - began) / num, "decoding": (decoded - sampled) / num},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", help="a generator .safetensors (default: the bundled one)")
    parser.add_argument("--tokenizer", help="its tokenizer .safetensors (default: the bundled one)")
    parser.add_argument("--train-videos", type=Path, required=True)
    parser.add_argument("--heldout-videos", type=Path, required=True)
    parser.add_argument("--exclude", nargs="*", default=[], help="file names left out of the training videos")
    parser.add_argument("-n", "--num", type=int, default=16, help="samples")
    parser.add_argument("--steps", type=int, nargs="+", default=[50], help="sampling steps (the first is measured in full)")
    parser.add_argument("--clips-per-video", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    tokenizer = load_model(args.tokenizer, device="cpu")
    sha = file_sha256(args.tokenizer) if args.tokenizer else None
    generator, metadata = load_generator(args.generator, device="cpu", tokenizer_sha256=sha)
    stats = LatentStats.from_json(metadata["latent_stats"])
    excluded = set(args.exclude)
    train = [p for p in list_videos(args.train_videos) if p.name not in excluded]
    heldout = list_videos(args.heldout_videos)
    result = measure(tokenizer, generator, stats, train, heldout, args.num, args.steps[0], args.seed, args.clips_per_video)
    result["speed"] = []
    for steps in args.steps:
        began = time.perf_counter()
        with torch.inference_mode():
            tokenizer.decode_video(generate_triplanes(generator, stats, num=2, steps=steps, seed=args.seed))
        result["speed"].append({"steps": steps, "seconds_per_video": (time.perf_counter() - began) / 2})
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
