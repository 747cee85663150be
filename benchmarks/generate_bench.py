"""Time per generated video against the sampler's step count: SiT sampling alone, the tokenizer's
decode of the whole clip alone, and both (the work of one generation job), with peak memory.

    python benchmarks/generate_bench.py                      # sit-tiny, bundled coordtok-tiny, CPU
    python benchmarks/generate_bench.py --generator sit-l/2 --tokenizer coordtok-l   # the GPU defaults
    python benchmarks/generate_bench.py --json benchmarks/results/generate_cpu.json

For each step count (default 8, 16, 32, 64) a batch of --batch videos is sampled by
`model.generate_triplanes` (--sampler, default euler: one network evaluation per step; heun takes
two) and decoded by `decode_video` (its default slicing; decoding does not depend on the steps, so
it is timed once and `total` is sampling plus decoding). Seconds are medians of --repeats runs,
divided by the batch. The generator's weights are random and its latent stats the identity (time
does not depend on them); the tokenizer is the bundled model on CPU and a random-weight coordtok-l
(128 frames at 128x128) on GPU, where both run under bf16 autocast. Peak memory: on GPU
`torch.cuda.max_memory_allocated` during the phase; on CPU the process's peak RSS during the phase
(the kernel's mark reset before it; where the reset is refused, the peak since start, and the JSON
says `peak_reset: false`), models included.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, print_table, time_it, write_json  # noqa: E402
from benchmarks.train_memory import MIB, peak_rss, reset_peak_rss  # noqa: E402
from coordtok.model import LatentStats, SiT, generate_triplanes, load_model, sit_preset  # noqa: E402
from coordtok.model.transport import SAMPLERS  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure(fn: Callable[[], object], device: str, repeats: int) -> tuple[float, float, bool]:
    """Median seconds of fn(), the peak memory in MiB while it ran, and whether the peak was reset."""
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        reset = True
    else:
        reset = reset_peak_rss()
    seconds = time_it(fn, device, repeats=repeats)
    peak = torch.cuda.max_memory_allocated() if on_gpu else peak_rss()
    return seconds, peak / MIB, reset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default=None, help="SiT preset (default: sit-l/2 on GPU, sit-tiny on CPU)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer preset or .safetensors (default: coordtok-l on GPU, the bundled model on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="videos per call (default: 4 on GPU, 1 on CPU)")
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 16, 32, 64], help="sampler step counts")
    parser.add_argument("--sampler", choices=SAMPLERS, default="euler")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write results to this JSON file")
    args = parser.parse_args()
    on_gpu = torch.device(args.device).type == "cuda"
    generator_name = args.generator or ("sit-l/2" if on_gpu else "sit-tiny")
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    batch = args.batch or (4 if on_gpu else 1)

    tokenizer = load_model(args.tokenizer or ("coordtok-l" if on_gpu else None), device=args.device)
    tokenizer_name = args.tokenizer or ("coordtok-l" if on_gpu else "bundled default (coordtok-tiny)")
    torch.manual_seed(0)
    generator = SiT(sit_preset(generator_name, tokenizer.config)).to(args.device).eval()
    channels = tokenizer.config.latent_channels
    identity = LatentStats((torch.zeros(channels),) * 3, (torch.ones(channels),) * 3)
    autocast = (
        torch.autocast(device_type=torch.device(args.device).type, dtype=dtype)
        if dtype != torch.float32 else contextlib.nullcontext()
    )

    # Sampling first: a CPU process's RSS keeps the heap that decoding grew.
    with torch.inference_mode(), autocast:
        sampled = {
            steps: measure(lambda: generate_triplanes(generator, identity, num=batch, steps=steps, sampler=args.sampler),
                           args.device, args.repeats)
            for steps in args.steps
        }
        triplane = generate_triplanes(generator, identity, num=batch, steps=1, sampler=args.sampler)
        decode_s, decode_mib, decode_reset = measure(lambda: tokenizer.decode_video(triplane), args.device, args.repeats)
    rows = [
        {"steps": steps, "sample s/video": round(sample_s / batch, 4), "decode s/video": round(decode_s / batch, 4),
         "total s/video": round((sample_s + decode_s) / batch, 4), "sample share": f"{sample_s / (sample_s + decode_s):.1%}",
         "sample peak MiB": round(sample_mib, 1), "decode peak MiB": round(decode_mib, 1)}
        for steps, (sample_s, sample_mib, _) in sampled.items()
    ]
    resets = [decode_reset, *(reset for _, _, reset in sampled.values())]

    c = tokenizer.config
    print(f"# {machine()['device']}; {generator_name} ({args.sampler}) + {tokenizer_name}, {c.frames} frames at "
          f"{c.height}x{c.width}, batch {batch}, {str(dtype).removeprefix('torch.')}")
    print_table(rows, ["steps", "sample s/video", "decode s/video", "total s/video", "sample share",
                       "sample peak MiB", "decode peak MiB"])
    write_json(args.json, "generate_bench", rows, {
        "generator": generator_name, "tokenizer": tokenizer_name, "sampler": args.sampler, "batch": batch,
        "frames": c.frames, "dtype": str(dtype).removeprefix("torch."), "repeats": args.repeats,
        "memory": "cuda max_memory_allocated" if on_gpu else "process peak RSS (ru_maxrss)",
        **({} if on_gpu else {"peak_reset": all(resets)}),
    })


if __name__ == "__main__":
    main()
