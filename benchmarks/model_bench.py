"""Encode and decode_video throughput of a CoordTok model, and the share of decode time spent
in triplane sampling.

    python benchmarks/model_bench.py                       # coordtok-tiny on CPU
    python benchmarks/model_bench.py --preset coordtok-l --dtype bf16   # on a GPU
    python benchmarks/model_bench.py --json benchmarks/results/model_cpu.json

Columns: clips/s and frames/s of `encode` (batch of --batch clips) and of `decode_video` (whole
clips, the model's default slicing); `sample share` is the time of the triplane_sample calls that
decode_video makes, timed alone on the same inputs, over the decode time. Weights are random:
throughput does not depend on them. On GPU, bf16 runs under autocast.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, print_table, time_it, write_json  # noqa: E402
from kernels import triplane_sample  # noqa: E402
from model import load_model  # noqa: E402
from model.triplane import frame_coords  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="default: coordtok-l on GPU, coordtok-tiny on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="clips per call (default: 4 on GPU, 1 on CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write results to this JSON file")
    args = parser.parse_args()
    on_gpu = torch.device(args.device).type == "cuda"
    name = args.preset or ("coordtok-l" if on_gpu else "coordtok-tiny")
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    batch = args.batch or (4 if on_gpu else 1)

    model = load_model(name, device=args.device)
    c = model.config
    video = torch.rand(batch, c.frames, c.height, c.width, 3, device=args.device) * 2 - 1
    autocast = (
        torch.autocast(device_type=torch.device(args.device).type, dtype=dtype)
        if dtype != torch.float32 else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        triplane = model.encode(video)
        encode_s = time_it(lambda: model.encode(video), args.device, repeats=args.repeats)
        decode_s = time_it(lambda: model.decode_video(triplane), args.device, repeats=args.repeats)
        s = c.decode_slice_frames
        slices = [frame_coords(c, a, min(a + s, c.frames)).to(args.device).expand(batch, -1, -1) for a in range(0, c.frames, s)]
        sample_s = time_it(lambda: [triplane_sample(*triplane.planes(), xyz) for xyz in slices], args.device, repeats=args.repeats)

    rows = [
        {"model": name, "op": "encode", "dtype": str(dtype).removeprefix("torch."), "batch": batch,
         "seconds": round(encode_s, 4), "clips/s": round(batch / encode_s, 3), "frames/s": round(batch * c.frames / encode_s, 1)},
        {"model": name, "op": "decode_video", "dtype": str(dtype).removeprefix("torch."), "batch": batch,
         "seconds": round(decode_s, 4), "clips/s": round(batch / decode_s, 3), "frames/s": round(batch * c.frames / decode_s, 1),
         "sample share": f"{sample_s / decode_s:.1%}"},
    ]
    print(f"# {machine()['device']}")
    print_table(rows, ["model", "op", "dtype", "batch", "seconds", "clips/s", "frames/s", "sample share"])
    write_json(args.json, "model_bench", rows)


if __name__ == "__main__":
    main()
