"""Compile the triplane kernels for GPU targets on a machine without a GPU, and read what ptxas says.

Each kernel is compiled exactly as a launch would compile it: the launches come from
:mod:`kernels.triton_triplane` (``launch_forward`` / ``launches_backward``) on CPU tensors of a
CoordTok-like shape, their arguments are specialised by Triton's own rules (pointers and
integers divisible by 16, integers equal to 1 as constants), and the PTX Triton produces is
assembled again by the ``ptxas`` its wheel bundles, with ``-v``, for the register and spill
counts. Used by tests/kernels/test_offline_compile.py, in this process for the installed Triton
and as ``python -m tests.kernels.offline_compile`` (one JSON line per kernel) for another one
put first on ``PYTHONPATH``.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend, get_ptxas
from triton.compiler import ASTSource

from coordtok.kernels import triton_triplane

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ARCHS = (80, 90)
CHANNELS = (8, 5)


@dataclass
class Report:
    kernel: str
    arch: int
    dtype: str
    c: int
    registers: int
    spill_stores: int
    spill_loads: int
    vector_loads: int  # ld.global.v2 / .v4 instructions in the PTX
    triton: str = triton.__version__


def launches(dtype: torch.dtype, c: int) -> list[triton_triplane.Launch]:
    """The forward and both backwards' launches for 4 videos of 4096 queries on CoordTok's planes."""
    b, n, rxy, rt = 4, 4096, 16, 32
    xy, yt, xt = (torch.zeros(b, r0, rxy, c, dtype=dtype) for r0 in (rxy, rt, rt))
    coords = torch.zeros(b, n, 3)
    out = torch.zeros(b, n, 3 * c, dtype=dtype)
    fast = tuple(torch.zeros(p.shape) for p in (xy, yt, xt))
    exact = tuple(torch.zeros(p.shape, dtype=dtype) for p in (xy, yt, xt))
    return [
        triton_triplane.launch_forward(xy, yt, xt, coords, out),
        *triton_triplane.launches_backward(out, coords, fast, deterministic=False, interpreted=False),
        triton_triplane.launches_backward(out, coords, exact, deterministic=True, interpreted=False)[0],
    ]


def source(launch: triton_triplane.Launch) -> ASTSource:
    """The ASTSource a launch with these arguments compiles (Triton's specialisation rules)."""
    fn = getattr(triton_triplane.device_code(interpreted=False), launch.name)
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    args = iter(launch.args)
    for index, param in enumerate(fn.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            continue
        kind, key = native_specialize_impl(CUDABackend, next(args), False, not param.do_not_specialize, True)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = key
        elif key:
            attrs[(index,)] = CUDABackend.parse_attr(key)
    return ASTSource(fn, signature, constexprs, attrs)


def compile_for(launch: triton_triplane.Launch, arch: int) -> tuple[str, dict]:
    """(PTX, ptxas -v counts) of one launch compiled for sm_<arch>."""
    options = dict(num_warps=triton_triplane.NUM_WARPS, enable_fp_fusion=False)
    compiled = triton.compile(source(launch), target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as file:
        file.write(ptx)
        file.flush()
        log = subprocess.run([get_ptxas(arch).path, "-v", "--fmad=false", f"--gpu-name={gpu}", file.name,
                              "-o", "/dev/null"], capture_output=True, text=True, check=True).stderr
    return ptx, {
        "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
        "spill_stores": int(re.search(r"(\d+) bytes spill stores", log).group(1)),
        "spill_loads": int(re.search(r"(\d+) bytes spill loads", log).group(1)),
    }


def reports(archs=ARCHS, dtypes=tuple(DTYPES), channels=CHANNELS) -> list[Report]:
    found = []
    for arch in archs:
        for dtype in dtypes:
            for c in channels:
                for launch in launches(DTYPES[dtype], c):
                    ptx, counts = compile_for(launch, arch)
                    vector_loads = len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]", ptx))
                    found.append(Report(launch.name, arch, dtype, c, vector_loads=vector_loads, **counts))
    return found


if __name__ == "__main__":
    for report in reports():
        print(json.dumps(asdict(report)), flush=True)
    sys.exit(0)
