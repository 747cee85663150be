"""Token shards: the dataset folder `coordtok encode-dataset` writes and `trainer.generator --tokens`
reads.

A dataset folder holds
- `shard-00000.safetensors`, `shard-00001.safetensors`, ...: shard s holds the clips of its videos
  (consecutive files of the sorted list), stacked in order video by video and clip by clip:
  planes `xy [N, Rxy, Rxy, C]`, `yt [N, Rt, Rxy, C]`, `xt [N, Rt, Rxy, C]` (float32). Its header
  metadata holds what it was made of (`ShardSpec`: its number, the count of shards, its source
  files, the encoding settings) and its manifest rows.
- `manifest.jsonl`, written once every shard exists: the rows of all shards, in order.

Manifest rows (JSON lines): one per clip, `{"source": "Class/v_x.avi", "shard": s, "index": i,
"clip": k, "clips": K, "frames": [a, b], "n_frames": b - a, "fps", "source_fps", "source_size",
"geometry", "model_id", "weights_sha256"}`, where `index` is the clip's row in its shard's planes
and `frames` the source frames [a, b) the clip holds (at `fps`; see model/clips.py for how clips
lie in a video); and one per unreadable video, `{"source", "shard", "error"}`. `source` is the
path under the dataset root, so a video's folder is its class (UCF-101's layout).

Why safetensors shards and not WebDataset tar files of token files: the generator trains on every
clip's triplane held as one tensor per plane, and a shard is that already (three tensor reads, no
per-clip parsing); safetensors loads without unpickling, like every weights and token file of the
project; and a shard's manifest rows live in its own header, so one atomic rename writes both: a
shard file that exists is finished. Tar files suit loaders that stream clip by clip, which the
generator does not need.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from coordtok.model.generate import flatten
from coordtok.model.triplane import PLANES, Triplane

FORMAT = "coordtok-token-shard/1"
MANIFEST = "manifest.jsonl"
_SHARD_GLOB = "shard-*.safetensors"


def shard_path(folder: str | Path, index: int) -> Path:
    return Path(folder) / f"shard-{index:05d}.safetensors"


def is_shard_folder(folder: str | Path) -> bool:
    """Whether `folder` is a dataset folder of `coordtok encode-dataset` (finished or not)."""
    return any(Path(folder).glob(_SHARD_GLOB))


@dataclass(frozen=True)
class ShardSpec:
    """What a shard is made of: shard `index` of `shards`, the clips of `sources` (paths under the
    dataset root) encoded with `settings` (model id, weights sha256, clip size and policy, fps,
    precision). A finished shard whose spec differs from the one planned was made from other files
    or settings."""

    index: int
    shards: int
    sources: tuple[str, ...]
    settings: dict

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "shard": str(self.index), "shards": str(self.shards),
                "sources": json.dumps(list(self.sources)), "settings": json.dumps(self.settings, sort_keys=True)}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> ShardSpec:
        return cls(int(meta["shard"]), int(meta["shards"]), tuple(json.loads(meta["sources"])), json.loads(meta["settings"]))


def write_atomically(path: Path, write: Callable[[Path], None], tmp_suffix: str = ".tmp") -> None:
    """`write(tmp)` then rename tmp to `path`, synced first, so `path` is either whole or absent
    (a run killed midway leaves at most the temporary file, which the next write replaces)."""
    tmp = path.with_name(path.name + tmp_suffix)
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(folder: str | Path, spec: ShardSpec, triplane: Triplane, rows: list[dict]) -> Path:
    """Write shard `spec.index` (planes float32 [N, ...], its manifest rows in its header) atomically."""
    path = shard_path(folder, spec.index)
    tensors = {name: plane.to("cpu", torch.float32).contiguous() for name, plane in zip(PLANES, triplane.planes())}
    metadata = {**spec.metadata(), "rows": json.dumps(rows)}
    write_atomically(path, lambda tmp: tmp.write_bytes(save(tensors, metadata=metadata)))  # mode by the umask
    return path


def read_header(path: Path) -> tuple[ShardSpec, list[dict]]:
    """A shard's spec and manifest rows, from its header only; ValueError for a file that is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        return ShardSpec.from_metadata(meta), json.loads(meta["rows"])
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise ValueError(f"{path} is not a whole token shard ({error}): delete it and run encode-dataset again") from None


def read_planes(path: Path) -> Triplane:
    with safe_open(str(path), framework="pt") as f:
        triplane = Triplane(*(f.get_tensor(name) for name in PLANES))
    if not all(bool(torch.isfinite(p).all()) for p in triplane.planes()):
        raise ValueError(f"{path} holds non-finite tokens")
    return triplane


def finished_specs(folder: str | Path) -> list[ShardSpec] | None:
    """The specs of every shard of a dataset folder, in order, when all of them are written and
    agree on the count and settings; None while some are missing."""
    paths = sorted(Path(folder).glob(_SHARD_GLOB))
    if not paths:
        return None
    specs = [read_header(path)[0] for path in paths]
    total, settings = specs[0].shards, specs[0].settings
    for path, spec in zip(paths, specs):
        if spec.shards != total or spec.settings != settings or path != shard_path(folder, spec.index):
            raise ValueError(f"{path} belongs to another encode-dataset run than {paths[0].name}: "
                             "keep the shards of one run in a folder")
    return specs if len(specs) == total else None


def write_manifest(folder: str | Path) -> bool:
    """Write manifest.jsonl from the shards' headers when every shard exists; False while some are
    missing. Processes that finish together may both write it: each through its own temporary file,
    with the same content."""
    specs = finished_specs(folder)
    if specs is None:
        return False
    lines = [json.dumps(row) + "\n" for spec in specs for row in read_header(shard_path(folder, spec.index))[1]]
    path = Path(folder) / MANIFEST
    write_atomically(path, lambda tmp: tmp.write_text("".join(lines)), tmp_suffix=f".{os.getpid()}.tmp")
    return True


def read_manifest(folder: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / MANIFEST).read_text().splitlines()]


def training_clips(folder: str | Path, weights_sha256: str, exclude: Sequence[str] = (),
                   conditional: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every clip of a finished dataset folder, for the generator: flattened triplanes [N, D]
    (float32), the class of each clip [N] and the class names (none unless `conditional`). A clip's
    class is its video's folder under the dataset root, as trainer.generator.training_files gives
    for videos; clips of videos whose file name is in `exclude` are left out. Refused: a folder
    whose run has not finished, and shards of other tokenizer weights than `weights_sha256`."""
    specs = finished_specs(folder)
    if specs is None:
        raise ValueError(f"{folder}: not every shard is written yet; finish the run with the same "
                         "`coordtok encode-dataset DIR -o OUT` command")
    if specs[0].settings["weights_sha256"] != weights_sha256:
        raise ValueError(f"{folder} holds the tokens of weights {specs[0].settings['weights_sha256'] or '(random)'}, "
                         f"not of the tokenizer {weights_sha256}")
    latents, sources, excluded = [], [], set(exclude)
    for spec in specs:
        path = shard_path(folder, spec.index)
        rows = [row for row in read_header(path)[1] if "index" in row and Path(row["source"]).name not in excluded]
        latents.append(flatten(read_planes(path)[[row["index"] for row in rows]]))
        sources += [row["source"] for row in rows]
    if not sources:
        raise ValueError(f"{folder} holds no clips to train on")
    if not conditional:
        return torch.cat(latents), torch.zeros(len(sources), dtype=torch.long), []
    names = [Path(source).parent.as_posix() for source in sources]
    classes = sorted(set(names))
    return torch.cat(latents), torch.tensor([classes.index(name) for name in names]), classes
