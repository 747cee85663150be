"""Peak memory of one CoordTok training step against clip length: the paper's memory claim.

    python benchmarks/train_memory.py                        # coordtok-tiny on CPU
    python benchmarks/train_memory.py --preset coordtok-l    # on a GPU (its default there)
    python benchmarks/train_memory.py --json benchmarks/results/train_memory_cpu.json

For each clip length T (default 16, 32, 64, 128) the preset is rebuilt with `frames=T` (and
`decode_slice_frames=min(16, T)`), and one training step (forward, loss, backward, AdamW step)
runs in two ways:

- sampled: CoordTok's training, which reconstructs N (default 1,024) patches at random
  coordinates of each clip in one decoder pass;
- all patches: the same model reconstructs every patch of the clip, through `decode_video`
  (its slicing policy: one decoder pass per `decode_slice_frames` frames, all kept for backward).

The loss is the paper's, `trainer.losses.patch_mse` (per-clip MSE over the patches, summed over
the batch). Inputs (clips, coordinates, target patches) are built before the measurement.

Each case runs in a fresh subprocess. CPU: the process's peak RSS is reset
(`/proc/self/clear_refs`) just before the step, and the step's memory is
`ru_maxrss` after it minus the RSS before it; where the reset is refused, the peak since start is
used instead (the row says `peak_reset: false`). GPU: `torch.cuda.max_memory_allocated` after the
step minus `memory_allocated` before it, with the peak statistics reset first. The step's memory
includes the gradients and the AdamW state, which the first step allocates.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, print_table, write_json  # noqa: E402
from coordtok.model import CoordTok, preset  # noqa: E402
from coordtok.model.triplane import frame_coords, video_to_patches  # noqa: E402
from coordtok.trainer.losses import patch_mse  # noqa: E402

MODES = ("sampled", "all")
MIB = 2**20


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS missing from /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (which ru_maxrss reads); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_inputs(model: CoordTok, mode: str, batch: int, patches: int, device: str) -> tuple:
    """Random clips [B, T, H, W, 3], n_frames [B], and for `sampled` the coordinates [B, N, 3]
    and target patches [B, N, V] of N random patches per clip; for `all` every target patch."""
    c = model.config
    generator = torch.Generator().manual_seed(0)
    video = (torch.rand(batch, c.frames, c.height, c.width, 3, generator=generator) * 2 - 1).to(device)
    n_frames = torch.full((batch,), c.frames, device=device)
    targets = video_to_patches(video, c)  # [B, nt*nx*ny, V]
    if mode == "all":
        return video, n_frames, None, targets
    all_coords = frame_coords(c, 0, c.frames)
    if patches > len(all_coords):
        raise ValueError(f"--patches {patches} exceeds the {len(all_coords)} patches of a {c.frames}-frame clip")
    index = torch.stack([torch.randperm(len(all_coords), generator=generator)[:patches] for _ in range(batch)])
    coords = all_coords[index].to(device)  # [B, N, 3]
    return video, n_frames, coords, torch.gather(targets, 1, index.to(device)[..., None].expand(-1, -1, targets.shape[2]))


def training_step(model: CoordTok, optimizer: torch.optim.Optimizer, mode: str, inputs: tuple) -> float:
    """One forward + backward + AdamW step; returns the loss."""
    video, n_frames, coords, targets = inputs
    if mode == "sampled":
        pred = model(video, n_frames, coords)  # [B, N, V]
    else:
        pred = video_to_patches(model.decode_video(model.encode(video, n_frames)), model.config)
    loss = patch_mse(pred, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def measure_case(name: str, frames: int, mode: str, batch: int, patches: int, device: str) -> dict:
    """Build the model for clips of `frames` frames and measure one training step (this process)."""
    config = dataclasses.replace(preset(name), frames=frames, decode_slice_frames=min(16, frames))
    torch.manual_seed(0)
    model = CoordTok(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = make_inputs(model, mode, batch, patches, device)
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset = reset_peak_rss()
        before = current_rss()
    start = time.perf_counter()
    loss = training_step(model, optimizer, mode, inputs)
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if on_gpu else peak_rss()
    row = {"mode": mode, "frames": frames, "patches": inputs[3].shape[1], "step_mib": round((peak - before) / MIB, 1),
           "before_mib": round(before / MIB, 1), "peak_mib": round(peak / MIB, 1),
           "seconds": round(seconds, 3), "loss": loss}
    if not on_gpu:
        row["peak_reset"] = reset
    return row


def run_case_subprocess(args: argparse.Namespace, name: str, frames: int, mode: str) -> dict:
    """Run one case in a fresh interpreter; the child prints its row as the last line of JSON."""
    command = [sys.executable, __file__, "--case", mode, "--frames", str(frames), "--preset", name,
               "--batch", str(args.batch), "--patches", str(args.patches), "--device", args.device]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"mode": mode, "frames": frames, "error": tail}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="default: coordtok-l on GPU, coordtok-tiny on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1, help="clips per step")
    parser.add_argument("--patches", type=int, default=1024, help="sampled patches per clip")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128], help="clip lengths T")
    parser.add_argument("--json", default=None, help="write results to this JSON file")
    parser.add_argument("--case", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    name = args.preset or ("coordtok-l" if torch.device(args.device).type == "cuda" else "coordtok-tiny")
    if args.case:
        print(json.dumps(measure_case(name, args.frames, args.case, args.batch, args.patches, args.device)))
        return

    cases, rows = [], []
    for frames in args.lengths:
        sampled, full = (run_case_subprocess(args, name, frames, mode) for mode in MODES)
        cases += [sampled, full]
        both = "step_mib" in sampled and "step_mib" in full
        rows.append({
            "T": frames,
            "patches (all)": full.get("patches", ""),
            "sampled MiB": sampled.get("step_mib", sampled.get("error")),
            "all-patches MiB": full.get("step_mib", full.get("error")),
            "ratio": f"{full['step_mib'] / sampled['step_mib']:.1f}x" if both else "",
        })
    print(f"# {machine()['device']}; {name}, batch {args.batch}, {args.patches} sampled patches per clip")
    print_table(rows, ["T", "patches (all)", "sampled MiB", "all-patches MiB", "ratio"])
    write_json(args.json, "train_memory", rows, {
        "preset": name, "batch": args.batch, "sampled_patches": args.patches, "device_arg": args.device,
        "measure": "cuda max_memory_allocated" if torch.device(args.device).type == "cuda" else "peak RSS (ru_maxrss, reset before the step) - RSS before the step",
        "cases": cases,
    })


if __name__ == "__main__":
    main()
