"""Encode and decode_video throughput of a CoordTok model, and the share of decode time spent
in triplane sampling.

    python benchmarks/model_bench.py                       # coordtok-tiny on CPU
    python benchmarks/model_bench.py --preset coordtok-l --dtype bf16 --variants base compiled   # GPU
    python benchmarks/model_bench.py --preset coordtok-l --dtype fp32 --variants base tf32       # GPU
    python benchmarks/model_bench.py --json benchmarks/results/model_cpu.json

Columns: clips/s and frames/s of `encode` (batch of --batch clips) and of `decode_video` (whole
clips in the model's decoder slices: 16 frames for the paper's model); `sample share` is the time
of the triplane_sample calls that decode_video makes, timed alone on the same inputs, over the
decode time. Weights are random: throughput does not depend on them. bf16 and fp16 run under
autocast. Variants, each its own pair of rows:

* ``base``: as the dtype says; fp32 matmuls in full fp32 (TF32 off).
* ``tf32`` (CUDA, meant with --dtype fp32): fp32 matmuls may use TF32, as the server allows.
* ``compiled``: the decoder compiled with ``torch.compile(dynamic=True)``, as
  ``COORDTOK_COMPILE_DECODER`` does (compile time is not counted: it happens in a warm-up run).

Variants run in the order above (``compiled`` last: it stays compiled); ``speed-up`` is a row's
clips/s over the first variant's for the same op.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, print_table, time_it, write_json  # noqa: E402
from coordtok.kernels import triplane_sample  # noqa: E402
from coordtok.model import load_model  # noqa: E402
from coordtok.model.triplane import frame_coords  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ("base", "tf32", "compiled")


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """fp32 matmuls on CUDA with or without TF32, restored afterwards."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        before = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if enabled else "ieee"
    else:
        before = matmul.allow_tf32
        matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        if hasattr(matmul, "fp32_precision"):
            matmul.fp32_precision = before
        else:
            matmul.allow_tf32 = before


def measure(model, video, dtype, device, repeats: int) -> tuple[float, float, float]:
    """(encode s, decode_video s, triplane_sample s inside that decode) for one batch."""
    c = model.config
    autocast = (torch.autocast(device_type=torch.device(device).type, dtype=dtype)
                if dtype != torch.float32 else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        triplane = model.encode(video)
        encode_s = time_it(lambda: model.encode(video), device, repeats=repeats)
        decode_s = time_it(lambda: model.decode_video(triplane), device, repeats=repeats)
        s = c.decode_slice_frames
        batch = video.shape[0]
        slices = [frame_coords(c, a, min(a + s, c.frames)).to(device).expand(batch, -1, -1) for a in range(0, c.frames, s)]
        sample_s = time_it(lambda: [triplane_sample(*triplane.planes(), xyz) for xyz in slices], device, repeats=repeats)
    return encode_s, decode_s, sample_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="default: coordtok-l on GPU, coordtok-tiny on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="clips per call (default: 4 on GPU, 1 on CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["base"])
    parser.add_argument("--json", default=None, help="write results to this JSON file")
    args = parser.parse_args()
    on_gpu = torch.device(args.device).type == "cuda"
    name = args.preset or ("coordtok-l" if on_gpu else "coordtok-tiny")
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    batch = args.batch or (4 if on_gpu else 1)
    if "tf32" in args.variants and not on_gpu:
        raise SystemExit("--variants tf32 needs a CUDA device")

    model = load_model(name, device=args.device)
    c = model.config
    video = torch.rand(batch, c.frames, c.height, c.width, 3, device=args.device) * 2 - 1
    rows, base = [], {}
    for variant in (v for v in VARIANTS if v in args.variants):
        if variant == "compiled":
            model.decoder.compile(dynamic=True)
        with tf32_matmuls(variant == "tf32"):
            encode_s, decode_s, sample_s = measure(model, video, dtype, args.device, args.repeats)
        for op, seconds in (("encode", encode_s), ("decode_video", decode_s)):
            row = {"model": name, "variant": variant, "op": op, "dtype": str(dtype).removeprefix("torch."),
                   "batch": batch, "seconds": round(seconds, 4), "clips/s": round(batch / seconds, 3),
                   "frames/s": round(batch * c.frames / seconds, 1)}
            if op == "decode_video":
                row["slice frames"] = c.decode_slice_frames
                row["sample share"] = f"{sample_s / decode_s:.1%}"
            base.setdefault(op, seconds)
            row["speed-up"] = f"{base[op] / seconds:.2f}x"
            rows.append(row)
    print(f"# {machine()['device']}")
    print_table(rows, ["model", "variant", "op", "dtype", "batch", "seconds", "clips/s", "frames/s", "slice frames",
                       "sample share", "speed-up"])
    write_json(args.json, "model_bench", rows)


if __name__ == "__main__":
    main()
