"""Host side of the fused Triton triplane kernels: which build runs, launches, autograd.

The device code lives in :mod:`kernels.triton_kernels`. It is built twice, on first use of each:

* for CUDA tensors, compiled by Triton (or interpreted, when the process set
  ``TRITON_INTERPRET=1`` itself: Triton's own debugging switch);
* for CPU tensors, by Triton's interpreter, whatever ``TRITON_INTERPRET`` says. The interpreter
  runs the kernels op by op in NumPy: exact, and slow (it is there for tests and debugging).

So the same process, e.g. the test suite on a GPU machine, runs CPU tensors in the interpreter
and CUDA tensors on the GPU. Every CUDA launch happens under its tensors' device
(``torch.cuda.device``), since Triton launches on the calling thread's current device.

Planes and coords are addressed through their strides, so non-contiguous views need no copy;
outputs are allocated contiguous and ``grad_out`` is made contiguous (it already is, usually).
``C`` is a compile-time constant (one compilation per channel count) and arbitrary: the channel
block is padded to a power of two and masked. The largest power of two dividing the planes' row
and column strides is passed as an alignment hint so that each corner's channel vector is read
with vector loads. The batch is the grid's second axis, so B is limited to 65535 on CUDA.

The backward is deterministic (the same bits on every run) when asked for: by
``torch.use_deterministic_algorithms(True)``, by ``COORDTOK_TRIPLANE_DETERMINISTIC=1`` or by
``deterministic=True`` (see :func:`kernels.triplane_sample`); else it uses the faster atomics.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
import threading
from dataclasses import dataclass
from types import ModuleType

import torch
import triton
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["TriplaneSampleFunction", "triplane_sample_triton", "device_code", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NUM_WARPS = 4
PLANE_COLUMNS = ((1, 2), (0, 2), (0, 1))  # coords columns (u, v) of xy, yt and xt
DEVICE_CODE = importlib.util.find_spec("coordtok.kernels.triton_kernels")
_builds: dict[bool, ModuleType] = {}
_builds_lock = threading.Lock()


def device_code(interpreted: bool) -> ModuleType:
    """:mod:`kernels.triton_kernels` built for Triton's interpreter or for GPUs (a module whose
    ``@triton.jit`` functions are ``InterpretedFunction`` or ``JITFunction`` objects)."""
    with _builds_lock:
        if interpreted not in _builds:
            name = f"{DEVICE_CODE.name}[{'interpreted' if interpreted else 'compiled'}]"
            spec = importlib.util.spec_from_file_location(name, DEVICE_CODE.origin)
            module = importlib.util.module_from_spec(spec)
            with triton.knobs.runtime.scope():
                triton.knobs.runtime.interpret = interpreted
                spec.loader.exec_module(module)
            sys.modules[name] = module  # the interpreter reads the kernels' source through it
            _builds[interpreted] = module
        return _builds[interpreted]


def _kernels_for(device: torch.device) -> ModuleType:
    if device.type == "cpu":
        return device_code(interpreted=True)
    return device_code(interpreted=bool(triton.knobs.runtime.interpret))


def is_interpreted(module: ModuleType) -> bool:
    """Whether a build of the device code runs in Triton's interpreter."""
    return type(module._triplane_fwd_kernel).__name__ == "InterpretedFunction"


def _on_device(device: torch.device):
    """Make ``device`` the current CUDA device for a launch (Triton launches on the current one)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=..., enable_fp_fusion=False)``.
    :func:`launches_forward` / :func:`launches_backward` build them, the launchers run them and
    the offline-compile test compiles exactly these for GPU targets."""

    name: str
    grid: tuple[int, int]
    args: tuple
    constexprs: dict

    def run(self, module: ModuleType) -> None:
        getattr(module, self.name)[self.grid](
            *self.args, **self.constexprs, num_warps=NUM_WARPS, enable_fp_fusion=False)


def _block_sizes(c: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_C) of the forward and fast backward: about 1024 (query, channel) elements per tile."""
    block_c = triton.next_power_of_2(c)
    return max(16, min(128, 1024 // block_c)), block_c


def _row_alignment(*planes: Tensor) -> int:
    """Largest power of two (at most 16) dividing every plane's row and column
    stride: the element alignment of each corner's channel vector."""
    g = math.gcd(*(s for p in planes for s in p.stride()[1:3]))
    return 16 if g == 0 else min(g & -g, 16)


def launch_forward(xy: Tensor, yt: Tensor, xt: Tensor, coords: Tensor, out: Tensor) -> Launch:
    """The forward launch writing ``out`` [B, N, 3C] (contiguous, the plane dtype)."""
    bsz, n, _ = coords.shape
    _, rx, ry, c = xy.shape
    block_n, block_c = _block_sizes(c)
    return Launch(
        "_triplane_fwd_kernel", (triton.cdiv(n, block_n), bsz),
        (coords, xy, yt, xt, out, n, rx, ry, yt.shape[1],
         *coords.stride(), *xy.stride(), *yt.stride(), *xt.stride()),
        dict(C=c, ALIGN=_row_alignment(xy, yt, xt), BLOCK_N=block_n, BLOCK_C=block_c),
    )


def launches_backward(grad_out: Tensor, coords: Tensor, grads: tuple[Tensor, Tensor, Tensor],
                      deterministic: bool, interpreted: bool) -> list[Launch]:
    """The backward launches from a contiguous ``grad_out`` [B, N, 3C] into ``grads``:
    contiguous [B, R0, R1, C] buffers, zeroed fp32 (atomics) or of any float dtype (deterministic).
    The interpreter runs the deterministic kernel with larger tiles: its cost is per operation,
    not per element."""
    bsz, n, c3 = grad_out.shape
    c = c3 // 3
    rx, ry = grads[0].shape[1:3]
    rt = grads[1].shape[1]
    if not deterministic:
        block_n, block_c = _block_sizes(c)
        return [Launch("_triplane_bwd_kernel", (triton.cdiv(n, block_n), bsz),
                       (coords, grad_out, *grads, n, rx, ry, rt, *coords.stride()),
                       dict(C=c, BLOCK_N=block_n, BLOCK_C=block_c))]
    block_c = max(16, triton.next_power_of_2(c))  # tl.dot needs 16 or more on each side
    block_s, block_n = (256, 256) if interpreted else (64, 64)
    return [
        Launch("_plane_grad_kernel", (triton.cdiv(grad.shape[1] * grad.shape[2], block_s), bsz),
               (coords, grad_out, grad, n, grad.shape[1], grad.shape[2], u_col, v_col, plane, *coords.stride()),
               dict(C=c, BLOCK_S=block_s, BLOCK_N=block_n, BLOCK_C=block_c))
        for plane, (grad, (u_col, v_col)) in enumerate(zip(grads, PLANE_COLUMNS))
    ]


def triplane_forward(xy: Tensor, yt: Tensor, xt: Tensor, coords: Tensor) -> Tensor:
    """Run the forward kernel. Shapes as in :func:`kernels.triplane_sample`;
    ``coords`` must be fp32. Returns a contiguous [B, N, 3C] in the plane dtype."""
    bsz, n, _ = coords.shape
    out = torch.empty((bsz, n, 3 * xy.shape[3]), dtype=xy.dtype, device=xy.device)
    if out.numel() > 0:
        with _on_device(out.device):
            launch_forward(xy, yt, xt, coords, out).run(_kernels_for(out.device))
    return out


def triplane_backward(
    grad_out: Tensor, coords: Tensor, rx: int, ry: int, rt: int, dtype: torch.dtype, deterministic: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the backward kernels.

    Args:
        grad_out: [B, N, 3C] gradient of the output (any float dtype; made
            contiguous, which it already is in the usual case).
        coords: [B, N, 3] fp32, the forward's coordinates.
        rx, ry, rt: plane resolutions.
        dtype: dtype of the returned plane gradients.
        deterministic: reduce in a fixed order (same bits every run) instead of with atomics.

    Returns:
        Contiguous gradients for xy [B, Rx, Ry, C], yt [B, Rt, Ry, C] and
        xt [B, Rt, Rx, C], accumulated in fp32 and cast to ``dtype``.
    """
    grad_out = grad_out.contiguous()
    bsz, n, c3 = grad_out.shape
    c = c3 // 3
    shapes = [(bsz, rx, ry, c), (bsz, rt, ry, c), (bsz, rt, rx, c)]
    sizes = [math.prod(shape) for shape in shapes]
    device = grad_out.device
    if deterministic:  # every cell is written once, already in the plane dtype
        buffer = (torch.zeros if n == 0 else torch.empty)(sum(sizes), dtype=dtype, device=device)
    else:  # one zeroed fp32 buffer for the three planes: one memset and one cast, not three
        buffer = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
    grads = tuple(g.view(shape) for g, shape in zip(buffer.split(sizes), shapes))
    if n > 0 and bsz > 0:
        module = _kernels_for(device)
        with _on_device(device):
            for launch in launches_backward(grad_out, coords, grads, deterministic, is_interpreted(module)):
                launch.run(module)
    if deterministic:
        return grads
    return tuple(g.view(shape) for g, shape in zip(buffer.to(dtype).split(sizes), shapes))


class TriplaneSampleFunction(torch.autograd.Function):
    """Autograd wiring: Triton forward, Triton backward for the three planes.

    ``coords`` receives no gradient. Double backward is not supported.
    """

    @staticmethod
    def forward(ctx, xy: Tensor, yt: Tensor, xt: Tensor, coords: Tensor, deterministic: bool) -> Tensor:
        coords = coords.detach().to(torch.float32)
        ctx.save_for_backward(coords)
        ctx.resolutions = (xy.shape[1], xy.shape[2], yt.shape[1])
        ctx.plane_dtype = xy.dtype
        ctx.deterministic = deterministic
        return triplane_forward(xy, yt, xt, coords)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        (coords,) = ctx.saved_tensors
        if not any(ctx.needs_input_grad[:3]):
            return None, None, None, None, None
        rx, ry, rt = ctx.resolutions
        gxy, gyt, gxt = triplane_backward(grad_out, coords, rx, ry, rt, ctx.plane_dtype, ctx.deterministic)
        needs = ctx.needs_input_grad
        return (gxy if needs[0] else None, gyt if needs[1] else None,
                gxt if needs[2] else None, None, None)


@torch.compiler.disable  # opaque to torch.compile: a compiled decoder calls the kernels as they are
def triplane_sample_triton(xy: Tensor, yt: Tensor, xt: Tensor, coords: Tensor, deterministic: bool = False) -> Tensor:
    """Triton triplane sampling with autograd. Inputs must already be validated
    (see :func:`kernels.triplane_sample`); planes in :data:`SUPPORTED_DTYPES`."""
    return TriplaneSampleFunction.apply(xy, yt, xt, coords, deterministic)
