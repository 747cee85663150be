"""The SiT generator a server samples with: loaded for the tokenizer it serves, or not at all."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from coordtok.model import LatentStats, SiT, Triplane, generate_triplanes
from coordtok.model.checkpoint import DEFAULT_GENERATOR, file_sha256
from coordtok.model.checkpoint import load_generator as load_sit
from coordtok.model.config import CoordTokConfig
from coordtok.service.jobs.job import JobError
from coordtok.service.jobs.request import GenerateRequest, JobRequest


@dataclass
class Generator:
    """A loaded SiT generator, the latent statistics it was trained with, and its identity (the
    file's stem and short hash; the whole sha256 of its weights)."""

    model: SiT
    stats: LatentStats
    model_id: str
    sha256: str

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    def check(self, request: GenerateRequest) -> None:
        """Refuse (JobError, 422) what this generator cannot do."""
        if request.class_label is not None:
            if self.num_classes == 0:
                raise JobError("this generator is unconditional: leave class_label out")
            if request.class_label >= self.num_classes:
                raise JobError(f"class_label must lie in [0, {self.num_classes - 1}] for this generator")
        if request.guidance != 1.0 and request.class_label is None:
            raise JobError("guidance above 1 needs a class_label (and a class-conditional generator)")

    def sample(self, request: JobRequest, videos: range, on_step: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> Triplane:
        """Triplanes of `videos` of `request`, on CPU in float32. Video k depends only on
        (seed, k); sampling raises SamplingCancelled between steps once `should_stop()` holds."""
        triplane = generate_triplanes(
            self.model, self.stats, num=len(videos), steps=request.steps, sampler=request.sampler,
            seed=request.seed, guidance=request.guidance, label=request.class_label, first=videos.start,
            on_step=on_step, should_stop=should_stop,
        )
        return triplane.to("cpu", torch.float32)


def load_generator(spec: str, tokenizer_sha256: str, tokenizer: CoordTokConfig,
                   device: str | torch.device) -> tuple[Generator | None, str]:
    """The generator of `spec` (a .safetensors path; empty: the bundled one; "none": no
    generator) for the tokenizer with weights `tokenizer_sha256` ('' for a random preset: not
    checked) and config `tokenizer` -> (Generator, ''), or (None, why not) when there is none or
    it does not fit."""
    if spec == "none":
        return None, "generation is turned off (the generator setting is 'none')"
    path = Path(spec) if spec else DEFAULT_GENERATOR
    if not path.is_file():
        return None, f"no generator file at {path}; set COORDTOK_GENERATOR to a generator .safetensors"
    try:
        model, metadata = load_sit(path, device=device, tokenizer_sha256=tokenizer_sha256 or None)
        stats = LatentStats.from_json(metadata["latent_stats"])
    except ValueError as error:
        return None, str(error)
    except SafetensorError as error:  # a damaged file: serve encode and decode without generation
        return None, f"the generator file {path} cannot be read ({error}); replace it"
    expected = (tokenizer.latent_res_xy, tokenizer.latent_res_t, tokenizer.latent_channels)
    c = model.config
    if (c.latent_res_xy, c.latent_res_t, c.latent_channels) != expected:
        return None, (f"{path} generates triplanes of (xy, t, channels) {(c.latent_res_xy, c.latent_res_t, c.latent_channels)}; "
                      f"the tokenizer's are {expected}")
    digest = file_sha256(path)
    return Generator(model, stats, f"{path.stem}@{digest[:12]}", digest), ""
