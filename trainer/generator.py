"""Train a SiT generator on the triplanes of a frozen CoordTok tokenizer.

    python -m coordtok.trainer.generator --tokenizer T.safetensors --videos DIR --run-dir runs/gen --steps 50000
    python -m coordtok.trainer.generator --tokenizer T.safetensors --tokens TOKEN_DIR --run-dir runs/gen
    torchrun --nproc_per_node=8 -m coordtok.trainer.generator --config gen.json
    python -m coordtok.trainer.generator --config gen.json --resume

Videos are cut into `clips_per_video` random clips each (as trainer.data.VideoClips draws them),
encoded once by the tokenizer (every process encodes its share) and cached in RUN/latents/, so a
resumed run reads them back; token files the server wrote, or the shards of `coordtok encode-dataset`
(trainer/token_shards.py), can be given instead. The triplanes are
normalised with the tokenizer's latent stats (measured on these clips when its file has none) and
SiT learns their flow-matching velocity (model/transport.py). The run folder holds config.json,
metrics.jsonl, checkpoints/ and export.safetensors (`model.load_generator`), which names the
tokenizer by the sha256 of its weights.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from coordtok.formats import tokens as token_files
from coordtok.model import CoordTok, LatentStats, SiT, load_model, save_generator, sit_preset
from coordtok.model.checkpoint import DEFAULT_WEIGHTS, file_sha256, read_metadata
from coordtok.model.clips import policy_for
from coordtok.model.generate import flatten, unflatten
from coordtok.model.transport import training_loss
from coordtok.trainer import distributed, loop, token_shards
from coordtok.trainer.data import VideoClips, list_videos
from coordtok.trainer.ema import EMA
from coordtok.trainer.generator_config import GeneratorConfig
from coordtok.trainer.loop import EpochSampler, TrainLoop, autocast_dtype, git_commit


class LabelledClips(Dataset):
    """The clips of one VideoClips per class, with the class: item -> (video, n_frames, label).

    A VideoClips takes an unreadable file's clip from the next file of its own list, so keeping
    each class in its own VideoClips keeps every clip's label true.
    """

    def __init__(self, classes: list[VideoClips]) -> None:
        self.classes = classes
        self.ends = list(itertools.accumulate(len(clips) for clips in classes))

    def __len__(self) -> int:
        return self.ends[-1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        label = bisect.bisect_right(self.ends, index)
        video, n_frames = self.classes[label][index - (self.ends[label - 1] if label else 0)]
        return video, n_frames, label


def training_files(config: GeneratorConfig) -> tuple[list[Path], list[int], list[str]]:
    """The video or token files to train on, the class of each and the class names (none unless
    `conditional`): a file's class is its folder under the data root, as in UCF-101's layout."""
    root = Path(config.videos or config.tokens)
    found = list_videos(root) if config.videos else sorted(root.rglob("*.safetensors"))
    files = [p for p in found if p.name not in set(config.exclude)]
    if not files:
        raise ValueError(f"no {'videos' if config.videos else 'token files (.safetensors)'} under {root}")
    if not config.conditional:
        return files, [0] * len(files), []
    names = [p.parent.relative_to(root).as_posix() for p in files]
    classes = sorted(set(names))
    return files, [classes.index(name) for name in names], classes


@torch.inference_mode()
def encode_clips(tokenizer: CoordTok, clips: Dataset, batch_size: int, workers: int,
                 amp_dtype: torch.dtype | None, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode (video, n_frames, label) items: flattened triplanes [N, D] (float32, CPU), labels [N]."""
    device = next(tokenizer.parameters()).device
    latents, labels = [], []
    loader = DataLoader(clips, batch_size=batch_size, num_workers=workers)
    for video, n_frames, label in tqdm(loader, desc="encoding clips", disable=not progress, dynamic_ncols=True):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            triplane = tokenizer.encode(video.to(device), n_frames.to(device))
        latents.append(flatten(triplane).float().cpu())
        labels.append(label)
    return torch.cat(latents), torch.cat(labels)


def read_token_files(files: list[Path], labels: list[int], shapes: tuple[tuple[int, int, int], ...],
                     tokenizer_sha256: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every clip of token files (safetensors as the server's /v1/encode writes them, read and
    checked by formats.tokens: planes xy, yt, xt [K, R0, R1, C], finite): flattened triplanes
    [N, D] and each clip's file label [N]. A file whose metadata names other tokenizer weights
    (`weights_sha256`) is refused."""
    latents, clip_labels = [], []
    for path, label in zip(files, labels):
        try:
            read = token_files.parse(path.read_bytes(), "safetensors", None, max_clips=1 << 20)
        except token_files.TokenError as error:
            raise ValueError(f"{path}: {error}") from None
        if read.metadata.weights_sha256 not in (None, tokenizer_sha256):
            raise ValueError(f"{path} holds the tokens of weights {read.metadata.weights_sha256}, "
                             f"not of the tokenizer {tokenizer_sha256}")
        found = tuple(tuple(plane.shape[1:]) for plane in read.triplane.planes())
        if found != shapes:
            raise ValueError(f"{path}: planes must be of shapes [K, *shape] for {shapes}, got {found}")
        latents.append(flatten(read.triplane))
        clip_labels += [label] * read.clips
    return torch.cat(latents), torch.tensor(clip_labels)


class GeneratorTrainer(TrainLoop):
    def __init__(self, config: GeneratorConfig, dist: distributed.Distributed) -> None:
        self.config, self.dist = config, dist
        self.run_dir = Path(config.run_dir)
        self.tokenizer_path = Path(config.tokenizer) if config.tokenizer else DEFAULT_WEIGHTS
        tokenizer = load_model(self.tokenizer_path, device=dist.device)
        self.tokenizer_sha256 = file_sha256(self.tokenizer_path)
        self.amp_dtype = autocast_dtype(config, dist.device)

        shards = bool(config.tokens) and token_shards.is_shard_folder(config.tokens)  # from encode-dataset
        if shards:
            latents, y, self.classes = token_shards.training_clips(config.tokens, self.tokenizer_sha256, config.exclude,
                                                                   config.conditional)
        else:
            files, labels, self.classes = training_files(config)
        overrides = {"num_classes": len(self.classes), **config.model_overrides}
        self.model_config = replace(sit_preset(config.model, tokenizer.config), **overrides)
        if self.model_config.num_classes != len(self.classes):
            raise ValueError(f"num_classes must be the {len(self.classes)} classes of the data (see --conditional)")
        shapes = self.model_config.plane_shapes
        if config.videos:
            latents, y = self.encode_videos(tokenizer, files, labels)
        elif not shards:
            latents, y = read_token_files(files, labels, shapes, self.tokenizer_sha256)
        del tokenizer
        triplanes = unflatten(latents, shapes)
        stats_json = read_metadata(self.tokenizer_path).get("latent_stats")
        if stats_json is None and dist.is_main:
            print("the tokenizer file has no latent stats: measuring them on the training clips", file=sys.stderr)
        self.stats = LatentStats.from_json(stats_json) if stats_json is not None else LatentStats.measure(triplanes)
        self.latents = flatten(self.stats.normalise(triplanes)).to(dist.device)  # [N, D]
        self.labels = y.to(dist.device)  # [N]
        if len(self.latents) // dist.world_size < config.batch_size:
            raise ValueError("fewer clips than one batch per process: lower --batch-size or raise --clips-per-video")

        torch.manual_seed(config.seed)
        self.model = SiT(self.model_config).to(dist.device)
        self.net = DistributedDataParallel(self.model) if dist.enabled else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler(enabled=self.amp_dtype == torch.float16)
        self.ema = EMA(self.model, config.ema_decay) if config.ema_decay > 0 else None
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + dist.rank)
        self.sampler = EpochSampler(len(self.latents), config.seed, dist.rank, dist.world_size)
        self.start_position()

    # -- data --------------------------------------------------------------------------------
    def encode_videos(self, tokenizer: CoordTok, files: list[Path], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The clips' triplanes flattened [N, D] (not normalised, CPU) and their labels [N]. Process
        r encodes clips r, r + world_size, ... into RUN/latents/KEY/r-of-world_size.safetensors
        (KEY: the tokenizer, files and clip settings), or finds them there; all then read every share."""
        config, c = self.config, tokenizer.config
        by_class = [[f for f, label in zip(files, labels) if label == k] for k in range(max(labels) + 1)]
        clips = LabelledClips([
            VideoClips(group, frames=c.frames, height=c.height, width=c.width, fps=config.fps or None,
                       clips_per_video=config.clips_per_video, seed=config.seed, policy=policy_for(c.reference_compat))
            for group in by_class
        ])
        rank, world = self.dist.rank, self.dist.world_size
        if len(clips) < world:
            raise ValueError(f"{len(clips)} clips cannot be shared by {world} processes: raise --clips-per-video")
        key = json.dumps([self.tokenizer_sha256, [str(f) for f in files], labels, config.clips_per_video,
                          config.fps, config.seed, str(self.amp_dtype)])
        folder = self.run_dir / "latents" / hashlib.sha256(key.encode()).hexdigest()[:16]
        share = folder / f"{rank}-of-{world}.safetensors"
        if not share.exists():
            latents, y = encode_clips(tokenizer, Subset(clips, range(rank, len(clips), world)), config.encode_batch,
                                      config.workers, self.amp_dtype, progress=self.dist.is_main)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = share.with_name(share.name + ".tmp")
            save_file({"latents": latents, "labels": y}, str(tmp))
            tmp.replace(share)
        if self.dist.enabled:
            torch.distributed.barrier()
        shares = [load_file(str(folder / f"{r}-of-{world}.safetensors")) for r in range(world)]
        latents = shares[0]["latents"].new_empty(len(clips), shares[0]["latents"].shape[1])
        y = torch.empty(len(clips), dtype=torch.long)
        for r, part in enumerate(shares):
            latents[r::world], y[r::world] = part["latents"], part["labels"]
        return latents, y

    def batches(self):
        """Micro-batches (normalised latents [B, D], labels [B]) forever, from the data position."""
        size = self.config.batch_size
        while True:
            self.sampler.set_position(self.epoch, self.batch_in_epoch * size)
            order = list(self.sampler)
            for start in range(0, len(order) - size + 1, size):
                self.batch_in_epoch += 1
                index = torch.tensor(order[start : start + size], device=self.latents.device)
                yield self.latents[index], self.labels[index]
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    # -- one step ----------------------------------------------------------------------------
    def loss(self, x1: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Flow-matching loss of latents x1 [B, D]; labels become the null class at the config's
        rate (a class-conditional model) or are dropped (an unconditional one)."""
        labels = self.model.drop_labels(y, self.generator) if self.classes else None
        shapes = self.model_config.plane_shapes

        def velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
            return flatten(self.net(unflatten(x, shapes), t, y))

        return training_loss(velocity, x1, labels, self.generator)

    def run_record(self) -> dict:
        return {"tokenizer_sha256": self.tokenizer_sha256, "clips": len(self.latents), "classes": self.classes}

    def export(self) -> None:
        """The serving file `export.safetensors` (EMA weights when the run keeps an EMA), for
        `model.load_generator`; it names the tokenizer by the sha256 of its weights."""
        save_generator(self.averaged_weights(), self.run_dir / "export.safetensors", self.stats, self.tokenizer_sha256, {
            "git_commit": git_commit(), "steps": str(self.step), "tokenizer": self.tokenizer_path.name,
            "classes": json.dumps(self.classes),
        })


def main(argv: list[str] | None = None) -> int:
    return loop.main(GeneratorTrainer, GeneratorConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
