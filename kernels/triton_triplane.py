"""Fused Triton kernels for triplane bilinear sampling (forward and backward).

One launch handles all three planes. The grid is ``(cdiv(N, BLOCK_N), B)``:
a program owns ``BLOCK_N`` queries of one video, reads each query's (t, x, y)
once, gathers the four corners of each plane (a video's planes are a few tens
of KB and stay in cache) and writes each query's 3C output channels once.

Backward scatters ``w * grad_out`` into an fp32 buffer per plane with relaxed
fp32 atomics, skipping corners whose bilinear weight is exactly zero (the
clamped upper neighbour at coordinate 1, and every query that lies on a grid
line), then casts the buffer to the plane dtype. Coordinates get no gradient.

Planes may be fp32, bf16 or fp16 (all interpolation math is fp32, output is
in the plane dtype); coords are fp32. Planes and coords are addressed through
their strides, so non-contiguous views need no copy; the output is allocated
contiguous and ``grad_out`` is made contiguous (it already is, usually). ``C``
is a compile-time constant (one compilation per channel count) and arbitrary:
the channel block is padded to a power of two and masked. The largest power of
two dividing the planes' row and column strides is passed as an alignment hint
so that each corner's channel vector is read with vector loads. Kernels are compiled with
``enable_fp_fusion=False`` so that no multiply-add is contracted into an FMA:
the arithmetic is then the reference's, rounding for rounding, so the fp32
forward should equal the reference bit for bit (the CPU tests check this under
the interpreter); the backward differs only by the order of atomic additions.

Semantics are those of :mod:`kernels.reference`, except that queries outside
[0, 1] (outside the contract) have their grid indices clamped so the kernel
never reads or writes out of bounds. The batch is the grid's second axis, so
B is limited to 65535 on CUDA.

Only ``tl.load`` / ``tl.store`` / ``tl.atomic_add`` on tensors of pointers are
used (no block pointers or tensor descriptors), so the kernels run on Triton
3.6 through 3.9 and under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["TriplaneSampleFunction", "triplane_sample_triton", "is_interpreted"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NUM_WARPS = 4


@triton.jit
def _corners(u, v, R0, R1):
    """Grid indices and fractions of queries ``(u, v)`` on an ``R0 x R1`` plane.

    Returns ``(i0, i1, j0, j1, f0, f1)``; ``i*`` are lower neighbours, ``j*``
    upper neighbours (clamped to the last row / column), ``f*`` fp32 fractions.
    """
    s0 = u * (R0 - 1)
    s1 = v * (R1 - 1)
    fl0 = tl.floor(s0)
    fl1 = tl.floor(s1)
    f0 = s0 - fl0
    f1 = s1 - fl1
    i0 = tl.minimum(tl.maximum(fl0.to(tl.int32), 0), R0 - 1)
    i1 = tl.minimum(tl.maximum(fl1.to(tl.int32), 0), R1 - 1)
    j0 = tl.minimum(i0 + 1, R0 - 1)
    j1 = tl.minimum(i1 + 1, R1 - 1)
    return i0, i1, j0, j1, f0, f1


@triton.jit
def _sample_plane(
    plane_ptr, b, u, v, offs_c, mask_nc,
    R0, R1, stride_b, stride_0, stride_1, stride_c, ALIGN: tl.constexpr,
):
    """Bilinear sample of one plane: [BLOCK_N] queries -> [BLOCK_N, BLOCK_C] fp32.

    ``ALIGN`` divides ``stride_0`` and ``stride_1``; the hint lets each corner's
    channel vector be read with vector loads.
    """
    i0, i1, j0, j1, f0, f1 = _corners(u, v, R0, R1)
    base = plane_ptr + b * stride_b
    chan = (offs_c * stride_c)[None, :]
    row_i = i0 * stride_0
    row_j = j0 * stride_0
    col_i = i1 * stride_1
    col_j = j1 * stride_1
    o00 = tl.multiple_of(row_i + col_i, ALIGN)[:, None]
    o01 = tl.multiple_of(row_i + col_j, ALIGN)[:, None]
    o10 = tl.multiple_of(row_j + col_i, ALIGN)[:, None]
    o11 = tl.multiple_of(row_j + col_j, ALIGN)[:, None]
    c00 = tl.load(base + o00 + chan, mask=mask_nc, other=0.0).to(tl.float32)
    c01 = tl.load(base + o01 + chan, mask=mask_nc, other=0.0).to(tl.float32)
    c10 = tl.load(base + o10 + chan, mask=mask_nc, other=0.0).to(tl.float32)
    c11 = tl.load(base + o11 + chan, mask=mask_nc, other=0.0).to(tl.float32)
    f0 = f0[:, None]
    f1 = f1[:, None]
    c0 = c00 * (1.0 - f1) + c01 * f1
    c1 = c10 * (1.0 - f1) + c11 * f1
    return c0 * (1.0 - f0) + c1 * f0


@triton.jit
def _scatter_plane(
    grad_ptr, b, u, v, g, offs_c, mask_nc,
    R0, R1, C,
):
    """Atomically add the bilinear weights times ``g`` [BLOCK_N, BLOCK_C] (fp32)
    into a contiguous fp32 gradient buffer [B, R0, R1, C]. Corners of zero
    weight are skipped: on CoordTok's patch grid most queries sit on grid
    lines, which cuts the atomics from 12 to about 5 per query and channel."""
    i0, i1, j0, j1, f0, f1 = _corners(u, v, R0, R1)
    base = grad_ptr + b * (R0 * R1 * C)
    chan = offs_c[None, :]
    w0 = (1.0 - f0)[:, None]
    w1 = f0[:, None]
    v0 = (1.0 - f1)[:, None]
    v1 = f1[:, None]
    g0 = g * w0
    g1 = g * w1
    row_i = i0 * (R1 * C)
    row_j = j0 * (R1 * C)
    col_i = i1 * C
    col_j = j1 * C
    tl.atomic_add(base + (row_i + col_i)[:, None] + chan, g0 * v0,
                  mask=mask_nc & ((w0 * v0) != 0.0), sem="relaxed")
    tl.atomic_add(base + (row_i + col_j)[:, None] + chan, g0 * v1,
                  mask=mask_nc & ((w0 * v1) != 0.0), sem="relaxed")
    tl.atomic_add(base + (row_j + col_i)[:, None] + chan, g1 * v0,
                  mask=mask_nc & ((w1 * v0) != 0.0), sem="relaxed")
    tl.atomic_add(base + (row_j + col_j)[:, None] + chan, g1 * v1,
                  mask=mask_nc & ((w1 * v1) != 0.0), sem="relaxed")


@triton.jit
def _load_coords(coords_ptr, b, offs_n, mask_n, stride_cb, stride_cn, stride_ck):
    """Load (t, x, y) for [BLOCK_N] queries of video ``b`` as fp32 vectors."""
    row = coords_ptr + b * stride_cb + offs_n.to(tl.int64) * stride_cn
    t = tl.load(row, mask=mask_n, other=0.0)
    x = tl.load(row + stride_ck, mask=mask_n, other=0.0)
    y = tl.load(row + 2 * stride_ck, mask=mask_n, other=0.0)
    return t, x, y


@triton.jit
def _triplane_fwd_kernel(
    coords_ptr, xy_ptr, yt_ptr, xt_ptr, out_ptr,
    N, RX, RY, RT,
    stride_cb, stride_cn, stride_ck,
    stride_xyb, stride_xy0, stride_xy1, stride_xyc,
    stride_ytb, stride_yt0, stride_yt1, stride_ytc,
    stride_xtb, stride_xt0, stride_xt1, stride_xtc,
    C: tl.constexpr, ALIGN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[b, n, :] = [xy(x, y), yt(t, y), xt(t, x)] for a block of queries;
    ``out`` is a contiguous [B, N, 3C]."""
    b = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask_nc = mask_n[:, None] & (offs_c < C)[None, :]
    t, x, y = _load_coords(coords_ptr, b, offs_n, mask_n, stride_cb, stride_cn, stride_ck)

    out = out_ptr + (b * N + offs_n)[:, None] * (3 * C) + offs_c[None, :]
    out_ty = out_ptr.dtype.element_ty
    s_xy = _sample_plane(xy_ptr, b, x, y, offs_c, mask_nc,
                         RX, RY, stride_xyb, stride_xy0, stride_xy1, stride_xyc, ALIGN)
    tl.store(out, s_xy.to(out_ty), mask=mask_nc)
    s_yt = _sample_plane(yt_ptr, b, t, y, offs_c, mask_nc,
                         RT, RY, stride_ytb, stride_yt0, stride_yt1, stride_ytc, ALIGN)
    tl.store(out + C, s_yt.to(out_ty), mask=mask_nc)
    s_xt = _sample_plane(xt_ptr, b, t, x, offs_c, mask_nc,
                         RT, RX, stride_xtb, stride_xt0, stride_xt1, stride_xtc, ALIGN)
    tl.store(out + 2 * C, s_xt.to(out_ty), mask=mask_nc)


@triton.jit
def _triplane_bwd_kernel(
    coords_ptr, grad_out_ptr, gxy_ptr, gyt_ptr, gxt_ptr,
    N, RX, RY, RT,
    stride_cb, stride_cn, stride_ck,
    C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Scatter a contiguous grad_out [B, N, 3C] into the three contiguous fp32
    plane-gradient buffers."""
    b = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask_nc = mask_n[:, None] & (offs_c < C)[None, :]
    t, x, y = _load_coords(coords_ptr, b, offs_n, mask_n, stride_cb, stride_cn, stride_ck)

    g_ptr = grad_out_ptr + (b * N + offs_n)[:, None] * (3 * C) + offs_c[None, :]
    g = tl.load(g_ptr, mask=mask_nc, other=0.0).to(tl.float32)
    _scatter_plane(gxy_ptr, b, x, y, g, offs_c, mask_nc, RX, RY, C)
    g = tl.load(g_ptr + C, mask=mask_nc, other=0.0).to(tl.float32)
    _scatter_plane(gyt_ptr, b, t, y, g, offs_c, mask_nc, RT, RY, C)
    g = tl.load(g_ptr + 2 * C, mask=mask_nc, other=0.0).to(tl.float32)
    _scatter_plane(gxt_ptr, b, t, x, g, offs_c, mask_nc, RT, RX, C)


def is_interpreted() -> bool:
    """True when this module's kernels were built by the Triton interpreter
    (``TRITON_INTERPRET=1`` was set before this module was imported)."""
    return type(_triplane_fwd_kernel).__name__ == "InterpretedFunction"


def _launch_config(n: int, b: int, c: int) -> tuple[tuple[int, int], int, int]:
    """Grid and block sizes: about 1024 (query, channel) elements per tile."""
    block_c = triton.next_power_of_2(c)
    block_n = max(16, min(128, 1024 // block_c))
    return (triton.cdiv(n, block_n), b), block_n, block_c


def _row_alignment(*planes: Tensor) -> int:
    """Largest power of two (at most 16) dividing every plane's row and column
    stride: the element alignment of each corner's channel vector."""
    g = math.gcd(*(s for p in planes for s in p.stride()[1:3]))
    return 16 if g == 0 else min(g & -g, 16)


def triplane_forward(xy: Tensor, yt: Tensor, xt: Tensor, coords: Tensor) -> Tensor:
    """Launch the forward kernel. Shapes as in :func:`kernels.triplane_sample`;
    ``coords`` must be fp32. Returns a contiguous [B, N, 3C] in the plane dtype."""
    bsz, n, _ = coords.shape
    _, rx, ry, c = xy.shape
    rt = yt.shape[1]
    out = torch.empty((bsz, n, 3 * c), dtype=xy.dtype, device=xy.device)
    if out.numel() == 0:
        return out
    grid, block_n, block_c = _launch_config(n, bsz, c)
    _triplane_fwd_kernel[grid](
        coords, xy, yt, xt, out,
        n, rx, ry, rt,
        *coords.stride(), *xy.stride(), *yt.stride(), *xt.stride(),
        C=c, ALIGN=_row_alignment(xy, yt, xt), BLOCK_N=block_n, BLOCK_C=block_c,
        num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )
    return out


def triplane_backward(
    grad_out: Tensor, coords: Tensor, rx: int, ry: int, rt: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward kernel.

    Args:
        grad_out: [B, N, 3C] gradient of the output (any float dtype; made
            contiguous, which it already is in the usual case).
        coords: [B, N, 3] fp32, the forward's coordinates.
        rx, ry, rt: plane resolutions.
        dtype: dtype of the returned plane gradients.

    Returns:
        Contiguous gradients for xy [B, Rx, Ry, C], yt [B, Rt, Ry, C] and
        xt [B, Rt, Rx, C], accumulated in fp32 and cast to ``dtype``.
    """
    grad_out = grad_out.contiguous()
    bsz, n, c3 = grad_out.shape
    c = c3 // 3
    shapes = [(bsz, rx, ry, c), (bsz, rt, ry, c), (bsz, rt, rx, c)]
    sizes = [math.prod(shape) for shape in shapes]
    # One fp32 buffer for the three planes: one memset and one cast, not three.
    accum = torch.zeros(sum(sizes), dtype=torch.float32, device=grad_out.device)
    if grad_out.numel() > 0:
        grid, block_n, block_c = _launch_config(n, bsz, c)
        _triplane_bwd_kernel[grid](
            coords, grad_out, *accum.split(sizes),
            n, rx, ry, rt,
            *coords.stride(),
            C=c, BLOCK_N=block_n, BLOCK_C=block_c,
            num_warps=_NUM_WARPS, enable_fp_fusion=False,
        )
    grads = accum.to(dtype).split(sizes)
    return tuple(g.view(shape) for g, shape in zip(grads, shapes))


class TriplaneSampleFunction(torch.autograd.Function):
    """Autograd wiring: Triton forward, Triton backward for the three planes.

    ``coords`` receives no gradient. Double backward is not supported.
    """

    @staticmethod
    def forward(ctx, xy: Tensor, yt: Tensor, xt: Tensor, coords: Tensor) -> Tensor:
        coords = coords.detach().to(torch.float32)
        ctx.save_for_backward(coords)
        ctx.resolutions = (xy.shape[1], xy.shape[2], yt.shape[1])
        ctx.plane_dtype = xy.dtype
        return triplane_forward(xy, yt, xt, coords)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        (coords,) = ctx.saved_tensors
        if not any(ctx.needs_input_grad[:3]):
            return None, None, None, None
        rx, ry, rt = ctx.resolutions
        gxy, gyt, gxt = triplane_backward(grad_out, coords, rx, ry, rt, ctx.plane_dtype)
        needs = ctx.needs_input_grad
        return (gxy if needs[0] else None, gyt if needs[1] else None,
                gxt if needs[2] else None, None)


def triplane_sample_triton(xy: Tensor, yt: Tensor, xt: Tensor, coords: Tensor) -> Tensor:
    """Triton triplane sampling with autograd. Inputs must already be validated
    (see :func:`kernels.triplane_sample`); planes in :data:`SUPPORTED_DTYPES`."""
    return TriplaneSampleFunction.apply(xy, yt, xt, coords)
