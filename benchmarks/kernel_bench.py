"""Benchmark triplane bilinear sampling: reference vs grid_sample vs torch.compile vs Triton.

Run from the repository root::

    python benchmarks/kernel_bench.py                       # CUDA if available, else CPU
    python benchmarks/kernel_bench.py --quick               # CPU smoke run (N=2048), < 1 min
    python benchmarks/kernel_bench.py --dtype bf16 --json benchmarks/results/kernel_h100.json
    python benchmarks/kernel_bench.py --variants reference triton --peak-gbps 3350

Variants (each timed for the forward pass and for forward + backward w.r.t. the planes):

* ``reference``: :func:`kernels.triplane_sample_reference` (PyTorch indexing).
* ``grid_sample``: three ``F.grid_sample(align_corners=True)`` calls, computed
  in fp32 (grids in half precision would lose coordinate bits). Its grid is
  (width, height) = (plane axis 1, plane axis 0).
* ``compile``: ``torch.compile`` of the reference. A failure becomes a row
  carrying the error instead of stopping the run.
* ``triton``: the fused kernels (CUDA only).
* ``triton-deterministic``: the same forward, and the fixed-order backward that
  ``torch.use_deterministic_algorithms(True)`` selects (CUDA only): its
  ``fwd+bwd`` row against ``triton``'s is the cost of a reproducible backward.

Every variant's output and plane gradients are checked against the reference
before it is timed; a mismatch is reported as that row's error.

Shapes: B=16, N=16384 queries per video, (Rxy, Rt, C) = (16, 32, 8) and
(64, 64, 16). Coordinates are random positions on CoordTok's patch grid
(128 frames x 16 x 16 patches), i.e. index / (count - 1).

Columns:

* ``ms``: median time of one call. CUDA: ``triton.testing.do_bench``
  (median); CPU: ``time.perf_counter`` over ``--repeats`` runs after
  ``--warmup`` runs (:func:`benchmarks.common.time_it`).
* ``GB/s``: ideal bytes / time. Forward bytes: coords (12 B per query) +
  output (3C elements per query) + the three planes read once per video.
  Forward + backward adds coords read again, grad_out read (3C per query) and
  the plane gradients written once (in the plane dtype).
* ``speed-up``: reference time / this variant's time, same shape and pass.
* ``floor ms`` and ``% peak`` (CUDA only): floor = bytes / ``--peak-gbps``
  (default 3350 GB/s, H100 SXM HBM3); ``% peak`` = floor / time.

``--json PATH`` also writes the rows with machine info (GPU name or CPU
model, torch / triton / Python versions; no hostname), see
:func:`benchmarks.common.machine`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, print_table, time_it, write_json  # noqa: E402
from coordtok.kernels import triplane_sample, triplane_sample_reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ("reference", "grid_sample", "compile", "triton", "triton-deterministic")
SHAPES = ((16, 32, 8), (64, 64, 16))
PATCH_GRID = (128, 16, 16)
CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 2**-6, torch.float16: 2**-9}

Sampler = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Shape:
    """B videos, N queries per video, plane resolutions Rxy and Rt, C channels."""

    b: int
    n: int
    rxy: int
    rt: int
    c: int

    def __str__(self) -> str:
        return f"B{self.b} N{self.n} Rxy{self.rxy} Rt{self.rt} C{self.c}"


@dataclass
class Row:
    """One table row; ``error`` is set instead of the timings when a variant fails."""

    shape: str
    variant: str
    pass_: str
    ms: float | None = None
    gbps: float | None = None
    speedup: float | None = None
    floor_ms: float | None = None
    pct_peak: float | None = None
    error: str | None = None


def triplane_sample_grid_sample(xy, yt, xt, coords):
    """[B, N, 3C] via three ``F.grid_sample`` calls, computed in fp32 (or fp64).

    grid_sample takes input [B, C, H, W] and a grid whose last dim is
    (w, h) in [-1, 1]; a plane [B, R0, R1, C] becomes H=R0, W=R1, so a query
    (u, v) on the plane is the grid point (2v - 1, 2u - 1).
    """
    compute = torch.promote_types(xy.dtype, torch.float32)
    t, x, y = coords.to(compute).unbind(-1)

    def one(plane, u, v):
        grid = (torch.stack([v, u], dim=-1) * 2 - 1).unsqueeze(1)  # [B, 1, N, 2]
        out = F.grid_sample(
            plane.to(compute).permute(0, 3, 1, 2), grid,
            mode="bilinear", padding_mode="border", align_corners=True,
        )  # [B, C, 1, N]
        return out[:, :, 0].transpose(1, 2)

    return torch.cat([one(xy, x, y), one(yt, t, y), one(xt, t, x)], dim=-1).to(xy.dtype)


def make_sampler(variant: str) -> Sampler:
    """The (xy, yt, xt, coords) -> [B, N, 3C] callable of one variant."""
    if variant == "reference":
        return triplane_sample_reference
    if variant == "grid_sample":
        return triplane_sample_grid_sample
    if variant == "compile":
        return torch.compile(triplane_sample_reference, dynamic=False)
    deterministic = variant == "triton-deterministic"
    return lambda xy, yt, xt, coords: triplane_sample(xy, yt, xt, coords, backend="triton", deterministic=deterministic)


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Planes (requiring grad), patch-grid coords and a grad_out for one shape."""
    gen = torch.Generator().manual_seed(seed)
    s, c = shape, shape.c
    planes = [
        torch.randn(s.b, r0, r1, c, generator=gen).to(device, dtype).requires_grad_()
        for r0, r1 in ((s.rxy, s.rxy), (s.rt, s.rxy), (s.rt, s.rxy))
    ]
    coords = torch.stack(
        [torch.randint(0, k, (s.b, s.n), generator=gen) / (k - 1) for k in PATCH_GRID], dim=-1
    ).float().to(device)
    grad_out = torch.randn(s.b, s.n, 3 * c, generator=gen).to(device, dtype)
    return planes, coords, grad_out


def ideal_bytes(shape: Shape, dtype: torch.dtype, backward: bool) -> int:
    """Minimum DRAM traffic of one call (see the module docstring)."""
    elem = torch.empty((), dtype=dtype).element_size()
    queries = shape.b * shape.n
    plane_bytes = shape.b * (shape.rxy * shape.rxy + 2 * shape.rt * shape.rxy) * shape.c * elem
    out_bytes = queries * 3 * shape.c * elem
    total = queries * 12 + out_bytes + plane_bytes
    if backward:
        total += queries * 12 + out_bytes + plane_bytes
    return total


def check_against_reference(sampler: Sampler, planes, coords, grad_out) -> str | None:
    """None if output and plane gradients match the reference, else a message."""
    tol = CHECK_TOL[planes[0].dtype]
    results = []
    for fn in (triplane_sample_reference, sampler):
        out = fn(*planes, coords)
        results.append([out, *torch.autograd.grad(out, planes, grad_out)])
    for name, expected, got in zip(("output", "d_xy", "d_yt", "d_xt"), *results):
        err = (got.float() - expected.float()).abs().max().item()
        scale = max(1.0, expected.float().abs().max().item())
        if not err <= tol * scale:
            return f"{name} differs from the reference: max abs error {err:.3g}"
    return None


def timer(device: torch.device, warmup: int, repeats: int) -> Callable[[Callable], float]:
    """Return a function that gives the median time of a callable in ms."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, return_mode="median")
    return lambda fn: 1e3 * time_it(fn, device, repeats=repeats, warmup=warmup)


def _describe(exc: Exception) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first_line}"


def _workload(sampler: Sampler, planes, coords, grad_out, backward: bool) -> Callable[[], None]:
    """One forward (no autograd graph) or one forward + backward w.r.t. the planes."""
    if backward:
        return lambda: torch.autograd.grad(sampler(*planes, coords), planes, grad_out)

    def forward():
        with torch.no_grad():
            sampler(*planes, coords)

    return forward


def bench_shape(shape, variants, dtype, device, measure, peak_gbps) -> list[Row]:
    """Check, then time every variant on one shape, forward and forward + backward."""
    planes, coords, grad_out = make_inputs(shape, dtype, device)
    rows = []
    for variant in variants:
        try:
            sampler = make_sampler(variant)
            error = None
            if variant != "reference":
                error = check_against_reference(sampler, planes, coords, grad_out)
        except Exception as exc:  # noqa: BLE001 - a failing variant becomes a row
            error = _describe(exc)
        for backward in (False, True):
            row = Row(str(shape), variant, "fwd+bwd" if backward else "fwd", error=error)
            rows.append(row)
            if error:
                continue
            try:
                row.ms = measure(_workload(sampler, planes, coords, grad_out, backward))
            except Exception as exc:  # noqa: BLE001
                row.error = _describe(exc)
                continue
            nbytes = ideal_bytes(shape, dtype, backward)
            row.gbps = nbytes / row.ms / 1e6
            if device.type == "cuda":
                row.floor_ms = nbytes / (peak_gbps * 1e6)
                row.pct_peak = 100 * row.floor_ms / row.ms
    reference_ms = {r.pass_: r.ms for r in rows if r.variant == "reference" and r.ms}
    for row in rows:
        if row.ms and row.pass_ in reference_ms:
            row.speedup = reference_ms[row.pass_] / row.ms
    return rows


def table_rows(rows: list[Row], on_cuda: bool) -> tuple[list[dict], list[str]]:
    """Formatted cells for :func:`benchmarks.common.print_table`, and its columns."""
    columns = ["shape", "variant", "pass", "ms", "GB/s", "speed-up"]
    columns += ["floor ms", "% peak"] if on_cuda else []
    cells = []
    for r in rows:
        row = {"shape": r.shape, "variant": r.variant, "pass": r.pass_}
        if r.error:
            row["ms"] = f"error: {r.error}"
        else:
            row.update({"ms": f"{r.ms:.3f}", "GB/s": f"{r.gbps:.2f}",
                        "speed-up": f"{r.speedup:.2f}x" if r.speedup else "-"})
            if on_cuda:
                row.update({"floor ms": f"{r.floor_ms:.4f}", "% peak": f"{r.pct_peak:.1f}"})
        cells.append(row)
    return cells, columns


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--n", type=int, default=16384, help="queries per video")
    p.add_argument("--quick", action="store_true", help="N=2048 and fewer repeats (CPU smoke run)")
    p.add_argument("--warmup", type=int, default=3, help="CPU warm-up runs")
    p.add_argument("--repeats", type=int, default=10, help="CPU timed runs")
    p.add_argument("--peak-gbps", type=float, default=3350.0, help="memory bandwidth for the floor")
    p.add_argument("--json", help="also write results to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    if args.quick:
        args.n, args.warmup, args.repeats = 2048, 1, 3
    variants = [v for v in args.variants if not v.startswith("triton") or device.type == "cuda"]
    dtype = DTYPES[args.dtype]
    measure = timer(device, args.warmup, args.repeats)

    rows = []
    for rxy, rt, c in SHAPES:
        shape = Shape(args.batch, args.n, rxy, rt, c)
        rows += bench_shape(shape, variants, dtype, device, measure, args.peak_gbps)

    info = machine()
    print(f"# {info['device']} | torch {info['torch']} | triton {info.get('triton')} | {args.dtype}")
    print_table(*table_rows(rows, device.type == "cuda"))
    results = [{("pass" if k == "pass_" else k): v for k, v in asdict(r).items()} for r in rows]
    config = {k: v for k, v in vars(args).items() if k != "json"}
    write_json(args.json, "kernel_bench", results, extra={"config": config})


if __name__ == "__main__":
    main()
