"""Device code of the fused Triton triplane kernels (forward, and two backwards).

This module holds only ``@triton.jit`` functions. :mod:`kernels.triton_triplane` builds it twice,
once compiled for GPUs and once for Triton's CPU interpreter, and launches the build that fits
the tensors' device; it also holds the launch configuration and the autograd wiring.

Forward: the grid is ``(cdiv(N, BLOCK_N), B)``. A program owns ``BLOCK_N`` queries of one
video, reads each query's (t, x, y) once, gathers the four corners of each plane (a video's
planes are a few tens of KB and stay in cache) and writes each query's 3C output channels once.

Backward, fast (``_triplane_bwd_kernel``): the same grid; ``w * grad_out`` is scattered into an
fp32 buffer per plane with relaxed fp32 atomics, skipping corners whose bilinear weight is
exactly zero (the clamped upper neighbour at coordinate 1, and every query that lies on a grid
line). The order of the atomic additions varies from run to run, so the gradient does in its
last bits.

Backward, deterministic (``_plane_grad_kernel``, one launch per plane): the grid is
``(cdiv(R0 * R1, BLOCK_S), B)``; a program owns ``BLOCK_S`` cells of one plane of one video and
walks the video's queries in blocks of ``BLOCK_N``, in order. For each block it forms the
bilinear weight of every (cell, query) pair (zero unless the cell is one of the query's corners)
and adds ``weights @ grad_out`` (an fp32 ``tl.dot``) to per-cell fp32 sums held in registers: each
block's partial sums are reduced in the dot's fixed order and the blocks are added one after the
other. No atomics, no memory read after another thread's write: the same inputs give the same bits
on every run. The work is (cells x queries x C) per video instead of (queries x C), which is
cheap only because CoordTok's planes are small; its time against the fast backward is the
``triton-deterministic`` row of benchmarks/kernel_bench.py (not yet measured on a GPU).

Planes may be fp32, bf16 or fp16 (all interpolation math is fp32, outputs are in the plane dtype);
coords are fp32. Kernels are compiled with ``enable_fp_fusion=False`` so that no multiply-add is
contracted into an FMA: the forward's arithmetic is then the reference's, rounding for rounding.
Queries outside [0, 1] (outside the contract) have their grid indices clamped so the kernels
never read or write out of bounds.

Only Triton builtins are used (``tl.load`` / ``tl.store`` / ``tl.atomic_add`` on tensors of
pointers, ``tl.dot``, ``tl.full``, ...): no block pointers or tensor descriptors, so the kernels
run on Triton 3.6 through 3.9; and none of triton.language's own ``@jit`` helpers (``tl.sum``,
``tl.zeros``), which an interpreted build of this module could not call.
"""

from __future__ import annotations

import triton
import triton.language as tl


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


@triton.jit(do_not_specialize=["u_col", "v_col", "plane"])
def _plane_grad_kernel(
    coords_ptr, grad_out_ptr, grad_ptr,
    N, R0, R1, u_col, v_col, plane,
    stride_cb, stride_cn, stride_ck,
    C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Deterministic gradient of one plane: grad [B, R0 * R1, C] (contiguous, in its dtype) from
    a contiguous grad_out [B, N, 3C], whose channels ``plane * C`` onwards belong to this plane,
    sampled at coords columns ``(u_col, v_col)``."""
    b = tl.program_id(1).to(tl.int64)
    cells = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)  # r0 * R1 + r1
    r0 = (cells // R1)[:, None]
    r1 = (cells % R1)[:, None]
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc = tl.full((BLOCK_S, BLOCK_C), 0.0, tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        row = coords_ptr + b * stride_cb + offs_n.to(tl.int64) * stride_cn
        u = tl.load(row + u_col * stride_ck, mask=mask_n, other=0.0)
        v = tl.load(row + v_col * stride_ck, mask=mask_n, other=0.0)
        i0, i1, j0, j1, f0, f1 = _corners(u, v, R0, R1)
        # weight[s, n] = (row weight of cell s's row) * (column weight of its column): the
        # bilinear weight of cell s for query n, zero unless s is one of the query's corners.
        rows = tl.where(r0 == i0[None, :], (1.0 - f0)[None, :], 0.0) + tl.where(r0 == j0[None, :], f0[None, :], 0.0)
        cols = tl.where(r1 == i1[None, :], (1.0 - f1)[None, :], 0.0) + tl.where(r1 == j1[None, :], f1[None, :], 0.0)
        weight = rows * cols  # [BLOCK_S, BLOCK_N]; masked queries have g = 0
        g_ptr = grad_out_ptr + (b * N + offs_n)[:, None] * (3 * C) + plane * C + offs_c[None, :]
        g = tl.load(g_ptr, mask=mask_n[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(weight, g, acc, input_precision="ieee")  # += weight @ g, in a fixed order
    out = grad_ptr + (b * (R0 * R1) + cells)[:, None] * C + offs_c[None, :]
    tl.store(out, acc.to(grad_ptr.dtype.element_ty), mask=(cells < R0 * R1)[:, None] & mask_c[None, :])
