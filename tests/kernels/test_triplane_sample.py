"""Tests for triplane bilinear sampling (kernels/).

CPU tensors sent to the Triton backend run in Triton's interpreter on every
machine (kernels/triton_triplane.py builds the kernels once for it); the CUDA
tests at the end repeat the parity and determinism checks on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import coordtok.kernels.triton_triplane as triton_impl
from coordtok.kernels import BACKEND_ENV, DETERMINISTIC_ENV, triplane_sample, triplane_sample_reference

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
requires_two_gpus = pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

# Tolerances for comparing the Triton backend with the reference. fp32 differs
# only by rounding order (atomics in backward). Half-precision outputs are fp32
# results cast once; allow two units in the last place (the interpreter casts
# fp32 -> bf16 by truncation, a GPU rounds to nearest).
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2 * 2.0**-10, atol=2 * 2.0**-10),
    torch.bfloat16: dict(rtol=2 * 2.0**-7, atol=2 * 2.0**-7),
}


@dataclass(frozen=True)
class Case:
    """One random triplane query: B videos, N queries, plane sizes, channels."""

    b: int
    n: int
    rx: int
    ry: int
    rt: int
    c: int
    dtype: torch.dtype = torch.float32
    strided: bool = False

    def seed(self) -> int:
        """A per-case seed that is stable across processes."""
        return zlib.crc32(str(self).encode())

    def __str__(self) -> str:
        layout = "strided" if self.strided else "contig"
        dt = str(self.dtype).removeprefix("torch.")
        return f"B{self.b}-N{self.n}-Rx{self.rx}-Ry{self.ry}-Rt{self.rt}-C{self.c}-{dt}-{layout}"


def make_plane(gen, b, r0, r1, c, dtype, device, strided):
    """Random [B, R0, R1, C] plane; ``strided`` gives a permuted, sliced view."""
    if not strided:
        return torch.randn(b, r0, r1, c, generator=gen).to(device=device, dtype=dtype)
    storage = torch.randn(c, b, r1, 2 * r0, generator=gen).to(device=device, dtype=dtype)
    plane = storage[..., ::2].permute(1, 3, 2, 0)
    assert not plane.is_contiguous()
    return plane


def make_coords(gen, b, n, rx, ry, rt, device, strided):
    """[B, N, 3] fp32 (t, x, y) mixing uniform values, exact 0 and 1, grid lines
    of every plane resolution and patch-index coordinates i / (count - 1)."""
    columns = []
    for res in (rt, rx, ry):
        uniform = torch.rand(b, n, generator=gen)
        on_grid = torch.randint(0, res, (b, n), generator=gen) / max(res - 1, 1)
        count = int(torch.randint(2, 129, (1,), generator=gen))
        patches = torch.randint(0, count, (b, n), generator=gen) / (count - 1)
        choice = torch.randint(0, 5, (b, n), generator=gen)
        col = torch.where(choice == 0, uniform, on_grid)
        col = torch.where(choice == 2, patches, col)
        col = torch.where(choice == 3, torch.zeros_like(col), col)
        col = torch.where(choice == 4, torch.ones_like(col), col)
        columns.append(col)
    coords = torch.stack(columns, dim=-1).float()
    if strided:
        coords = coords.permute(2, 0, 1).contiguous().permute(1, 2, 0)
        assert coords.stride(-1) != 1
    return coords.to(device)


def make_inputs(case: Case, seed: int, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    xy = make_plane(gen, case.b, case.rx, case.ry, case.c, case.dtype, device, case.strided)
    yt = make_plane(gen, case.b, case.rt, case.ry, case.c, case.dtype, device, case.strided)
    xt = make_plane(gen, case.b, case.rt, case.rx, case.c, case.dtype, device, case.strided)
    coords = make_coords(gen, case.b, case.n, case.rx, case.ry, case.rt, device, case.strided)
    grad_out = torch.randn(case.b, 3 * case.c, case.n, generator=gen).to(device, case.dtype)
    grad_out = grad_out.transpose(1, 2) if case.strided else grad_out.transpose(1, 2).contiguous()
    return xy, yt, xt, coords, grad_out


def forward_backward(backend, xy, yt, xt, coords, grad_out, deterministic=None):
    """Output and plane gradients of one backend on leaf copies of the planes."""
    planes = [p.detach().requires_grad_(True) for p in (xy, yt, xt)]
    out = triplane_sample(*planes, coords, backend=backend, deterministic=deterministic)
    grads = torch.autograd.grad(out, planes, grad_out)
    return out, grads


def assert_parity(case: Case, seed: int, device: str, deterministic: bool = False) -> None:
    xy, yt, xt, coords, grad_out = make_inputs(case, seed, device)
    coords_before = coords.clone()
    out, grads = forward_backward("triton", xy, yt, xt, coords, grad_out, deterministic)
    ref_out, ref_grads = forward_backward("reference", xy, yt, xt, coords, grad_out)

    assert torch.equal(coords, coords_before)
    assert out.shape == (case.b, case.n, 3 * case.c)
    assert out.dtype == case.dtype
    tol = TOLERANCES[case.dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)
    if device == "cpu" and case.dtype == torch.float32:
        # The interpreter evaluates the kernel op by op in IEEE fp32, in the
        # reference's order: any reordering of the arithmetic shows up here.
        assert torch.equal(out, ref_out)
    for name, grad, ref_grad, plane in zip(("xy", "yt", "xt"), grads, ref_grads, (xy, yt, xt)):
        assert grad.shape == plane.shape and grad.dtype == case.dtype, name
        torch.testing.assert_close(
            grad.float(), ref_grad.float(), **tol, msg=lambda m: f"d{name}: {m}"
        )


# --------------------------------------------------------------------------
# 1. Reference semantics
# --------------------------------------------------------------------------

def hand_case():
    """R=2 xy plane, Rt=3 yt / xt planes with one channel, and the expected
    samples worked out by hand for five (t, x, y) queries."""
    xy = torch.tensor([[1.0, 2.0], [3.0, 4.0]])                 # [x, y]
    yt = torch.tensor([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])  # [t, y]
    xt = torch.tensor([[100.0, 200.0], [300.0, 400.0], [500.0, 600.0]])  # [t, x]
    coords = torch.tensor([
        [0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0],
        [0.5, 0.5, 0.5],
        [0.25, 1.0, 0.0],
        [0.75, 0.0, 1.0],
    ])
    expected = torch.tensor([
        [1.0, 10.0, 100.0],
        [4.0, 60.0, 600.0],
        [2.5, 35.0, 350.0],
        [3.0, 20.0, 300.0],
        [2.0, 50.0, 400.0],
    ])
    return [p[None, ..., None] for p in (xy, yt, xt)], coords[None], expected[None]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_hand_computed_samples(backend):
    (xy, yt, xt), coords, expected = hand_case()
    out = triplane_sample(xy, yt, xt, coords, backend=backend)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def paper_loop(plane: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Scalar fp32 transcription of the paper's bilinear lookup, one query at a time."""
    f32 = np.float32
    bsz, r0, r1, _ = plane.shape
    out = np.empty(u.shape + (plane.shape[-1],), dtype=f32)
    for b in range(bsz):
        for q in range(u.shape[1]):
            s0 = f32(u[b, q]) * f32(r0 - 1)
            s1 = f32(v[b, q]) * f32(r1 - 1)
            i0, i1 = int(np.floor(s0)), int(np.floor(s1))
            j0, j1 = min(i0 + 1, r0 - 1), min(i1 + 1, r1 - 1)
            f0, f1 = f32(s0 - f32(i0)), f32(s1 - f32(i1))
            c0 = plane[b, i0, i1] * (f32(1) - f1) + plane[b, i0, j1] * f1
            c1 = plane[b, j0, i1] * (f32(1) - f1) + plane[b, j0, j1] * f1
            out[b, q] = c0 * (f32(1) - f0) + c1 * f0
    return out


def test_reference_matches_paper_lookup_bitwise():
    case = Case(b=2, n=150, rx=16, ry=16, rt=32, c=4)
    xy, yt, xt, coords, _ = make_inputs(case, seed=11)
    out = triplane_sample_reference(xy, yt, xt, coords)
    t, x, y = (coords[..., k].numpy() for k in range(3))
    expected = np.concatenate(
        [paper_loop(xy.numpy(), x, y), paper_loop(yt.numpy(), t, y), paper_loop(xt.numpy(), t, x)],
        axis=-1,
    )
    assert torch.equal(out, torch.from_numpy(expected))


def test_reference_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    shapes = [(2, 3, 4, 2), (2, 5, 4, 2), (2, 5, 3, 2)]
    planes = [torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]
    coords = torch.rand(2, 7, 3, generator=gen, dtype=torch.float64)
    coords[0, 0] = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b, c: triplane_sample_reference(a, b, c, coords), planes
    )


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_upper_neighbour_stays_inside_the_plane(backend):
    """At coordinate 1 the upper neighbour is the last row / column itself.
    NaNs placed just past the end of a row (contiguous layout: the next row's
    first cell) and of the last row (the next video's first row) must not
    reach the queries at x = 1 or y = 1, even with zero weight."""
    xy = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 1)
    xy[0, 1, 0] = float("nan")
    xy[1, 0, :] = float("nan")
    yt = torch.zeros(2, 3, 4, 1)
    xt = torch.zeros(2, 3, 4, 1)
    coords = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 1.0, 0.5]], [[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]]])
    out = triplane_sample(xy, yt, xt, coords, backend=backend)
    torch.testing.assert_close(out[..., 0], torch.tensor([[3.0, 13.5], [31.0, 31.0]]))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_coords_are_not_modified(backend):
    case = Case(b=2, n=40, rx=5, ry=6, rt=7, c=3)
    xy, yt, xt, coords, _ = make_inputs(case, seed=5)
    before = coords.clone()
    triplane_sample(xy, yt, xt, coords, backend=backend)
    assert torch.equal(coords, before)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_coords_receive_no_gradient(backend):
    (xy, yt, xt), coords, _ = hand_case()
    xy.requires_grad_(True)
    coords.requires_grad_(True)
    triplane_sample(xy, yt, xt, coords, backend=backend).sum().backward()
    assert coords.grad is None
    assert xy.grad is not None


def test_half_precision_reference_computes_in_fp32():
    case = Case(b=2, n=300, rx=9, ry=9, rt=17, c=3)
    xy, yt, xt, coords, _ = make_inputs(case, seed=8)
    planes = [p.to(torch.bfloat16) for p in (xy, yt, xt)]
    out = triplane_sample_reference(*planes, coords)
    expected = triplane_sample_reference(*(p.float() for p in planes), coords).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------
# 2. Triton (interpreter on CPU) == reference, forward and backward
# --------------------------------------------------------------------------

CPU_CASES = [
    Case(b=1, n=1, rx=2, ry=2, rt=3, c=1),
    Case(b=2, n=777, rx=16, ry=16, rt=32, c=8),
    Case(b=2, n=5000, rx=23, ry=23, rt=40, c=5, strided=True),
    Case(b=4, n=1000, rx=7, ry=7, rt=2, c=3),
    Case(b=2, n=513, rx=6, ry=11, rt=13, c=16, strided=True),
    Case(b=2, n=600, rx=16, ry=16, rt=32, c=8, dtype=torch.float16),
    Case(b=2, n=600, rx=16, ry=16, rt=32, c=8, dtype=torch.bfloat16),
    Case(b=3, n=333, rx=12, ry=12, rt=5, c=3, dtype=torch.bfloat16, strided=True),
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_triton_matches_reference_cpu(case, deterministic):
    assert_parity(case, seed=case.seed(), device="cpu", deterministic=deterministic)


DETERMINISM_CASES = [
    Case(b=2, n=1500, rx=16, ry=16, rt=32, c=8),
    Case(b=3, n=700, rx=9, ry=13, rt=17, c=5, dtype=torch.bfloat16, strided=True),
    Case(b=2, n=600, rx=16, ry=16, rt=32, c=8, dtype=torch.float16),
]


def assert_deterministic_backward(case: Case, device: str) -> None:
    """Two deterministic backwards give the same bits, and match the reference."""
    xy, yt, xt, coords, grad_out = make_inputs(case, case.seed(), device)
    _, first = forward_backward("triton", xy, yt, xt, coords, grad_out, deterministic=True)
    _, second = forward_backward("triton", xy, yt, xt, coords, grad_out, deterministic=True)
    _, expected = forward_backward("reference", xy, yt, xt, coords, grad_out)
    for a, b, ref in zip(first, second, expected):
        assert a.dtype == case.dtype and torch.equal(a, b)
        torch.testing.assert_close(a.float(), ref.float(), **TOLERANCES[case.dtype])


@pytest.mark.parametrize("case", DETERMINISM_CASES, ids=str)
def test_deterministic_backward_repeats_bit_for_bit_cpu(case):
    assert_deterministic_backward(case, "cpu")


def backward_modes(monkeypatch) -> list[bool]:
    """Record the ``deterministic`` flag of every Triton backward run."""
    modes, real = [], triton_impl.triplane_backward

    def recording(*args):
        modes.append(args[-1])
        return real(*args)

    monkeypatch.setattr(triton_impl, "triplane_backward", recording)
    return modes


def test_deterministic_backward_is_chosen_by_torch_keyword_or_setting(monkeypatch):
    (xy, yt, xt), coords, _ = hand_case()
    modes = backward_modes(monkeypatch)
    monkeypatch.delenv(DETERMINISTIC_ENV, raising=False)

    def backward(**kwargs):
        planes = [p.detach().requires_grad_(True) for p in (xy, yt, xt)]
        triplane_sample(*planes, coords, backend="triton", **kwargs).sum().backward()

    backward()
    backward(deterministic=True)
    monkeypatch.setenv(DETERMINISTIC_ENV, "1")
    backward()
    backward(deterministic=False)
    monkeypatch.delenv(DETERMINISTIC_ENV)
    torch.use_deterministic_algorithms(True)
    try:
        backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert modes == [False, True, True, False, True]
    monkeypatch.setenv(DETERMINISTIC_ENV, "yes please")
    with pytest.raises(ValueError, match=DETERMINISTIC_ENV):
        backward()


def test_cpu_tensors_run_interpreted_and_cuda_tensors_compiled_in_one_process():
    """The two builds of the device code, whatever TRITON_INTERPRET says."""
    assert triton_impl.is_interpreted(triton_impl.device_code(interpreted=True))
    assert not triton_impl.is_interpreted(triton_impl.device_code(interpreted=False))
    assert triton_impl._kernels_for(torch.device("cpu")) is triton_impl.device_code(interpreted=True)
    guard = triton_impl._on_device(torch.device("cuda", 1))  # a launch on cuda:1 runs under cuda:1
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def test_triton_on_cpu_tensors_needs_no_interpreter_switch():
    """The issue's reproduction: with TRITON_INTERPRET=0 (as on a GPU machine) CPU tensors forced to
    the Triton backend still run, in the interpreter, and match the reference."""
    script = (
        "import torch\n"
        "from kernels import triplane_sample\n"
        "planes = [torch.randn(2, r, 6, 3) for r in (5, 7, 7)]\n"
        "planes[2] = torch.randn(2, 7, 5, 3)\n"
        "coords = torch.rand(2, 40, 3)\n"
        "out = triplane_sample(*planes, coords, backend='triton')\n"
        "assert torch.equal(out, triplane_sample(*planes, coords, backend='reference'))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_triton_handles_empty_query_set():
    xy = torch.randn(2, 4, 5, 3, requires_grad=True)
    yt = torch.randn(2, 6, 5, 3, requires_grad=True)
    xt = torch.randn(2, 6, 4, 3, requires_grad=True)
    out = triplane_sample(xy, yt, xt, torch.zeros(2, 0, 3), backend="triton")
    assert out.shape == (2, 0, 9)
    out.sum().backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in (xy, yt, xt))


def test_triton_grad_only_for_planes_that_require_it():
    case = Case(b=1, n=50, rx=4, ry=4, rt=6, c=2)
    xy, yt, xt, coords, grad_out = make_inputs(case, seed=2)
    yt.requires_grad_(True)
    out = triplane_sample(xy, yt, xt, coords, backend="triton")
    out.backward(grad_out)
    assert xy.grad is None and xt.grad is None
    _, ref_grads = forward_backward("reference", xy, yt, xt, coords, grad_out)
    torch.testing.assert_close(yt.grad, ref_grads[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "c, strided", [(8, False), (3, False), (16, False), (32, False), (8, True), (6, True)]
)
def test_alignment_hint_divides_plane_strides(c, strided):
    """On a GPU the hint licenses vector loads: it must divide every row and
    column stride, and be the largest power of two (up to 16) that does."""
    from coordtok.kernels.triton_triplane import _row_alignment

    xy, yt, xt, _, _ = make_inputs(Case(b=2, n=1, rx=5, ry=6, rt=7, c=c, strided=strided), seed=0)
    strides = [s for p in (xy, yt, xt) for s in p.stride()[1:3]]
    align = _row_alignment(xy, yt, xt)
    assert all(s % align == 0 for s in strides)
    assert align == 16 or any(s % (2 * align) for s in strides)


# --------------------------------------------------------------------------
# 3. Dispatch and validation
# --------------------------------------------------------------------------

def backend_used(monkeypatch, env, backend=None):
    """Name of the autograd node produced by one call: tells the backends apart."""
    if env is None:
        monkeypatch.delenv(BACKEND_ENV, raising=False)
    else:
        monkeypatch.setenv(BACKEND_ENV, env)
    (xy, yt, xt), coords, _ = hand_case()
    xy.requires_grad_(True)
    out = triplane_sample(xy, yt, xt, coords, backend=backend)
    return "triton" if "TriplaneSampleFunction" in type(out.grad_fn).__name__ else "reference"


@pytest.mark.parametrize(
    "env, backend, expected",
    [
        (None, None, "reference"),
        ("auto", None, "reference"),
        ("triton", None, "triton"),
        (" Triton ", None, "triton"),
        ("reference", None, "reference"),
        ("triton", "reference", "reference"),
        ("reference", "triton", "triton"),
    ],
)
def test_cpu_dispatch(monkeypatch, env, backend, expected):
    assert backend_used(monkeypatch, env, backend) == expected


def test_bad_backend_names_raise(monkeypatch):
    (xy, yt, xt), coords, _ = hand_case()
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        triplane_sample(xy, yt, xt, coords)
    monkeypatch.delenv(BACKEND_ENV)
    with pytest.raises(ValueError, match="backend="):
        triplane_sample(xy, yt, xt, coords, backend="fast")


def test_forced_triton_without_triton_raises(monkeypatch):
    (xy, yt, xt), coords, _ = hand_case()
    monkeypatch.setitem(sys.modules, "coordtok.kernels.triton_triplane", None)
    with pytest.raises(RuntimeError, match=f"{BACKEND_ENV}=reference"):
        triplane_sample(xy, yt, xt, coords, backend="triton")
    assert triplane_sample(xy, yt, xt, coords).shape == (1, 5, 3)


def test_forced_triton_on_another_device_type_raises():
    (xy, yt, xt), coords, _ = hand_case()
    meta = [t.to("meta") for t in (xy, yt, xt, coords)]
    with pytest.raises(RuntimeError, match=f"{BACKEND_ENV}=reference"):
        triplane_sample(*meta, backend="triton")


def test_triton_rejects_float64_planes():
    (xy, yt, xt), coords, _ = hand_case()
    with pytest.raises(ValueError, match="backend='reference'"):
        triplane_sample(xy.double(), yt.double(), xt.double(), coords, backend="triton")


def _valid():
    return dict(
        xy=torch.zeros(2, 4, 5, 3), yt=torch.zeros(2, 6, 5, 3),
        xt=torch.zeros(2, 6, 4, 3), coords=torch.zeros(2, 7, 3),
    )


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("xy", torch.zeros(2, 4, 5), r"xy must have shape \[B, R0, R1, C\]"),
        ("coords", torch.zeros(2, 7, 2), r"coords must have shape \[B, N, 3\]"),
        ("coords", torch.zeros(14, 3), r"coords must have shape \[B, N, 3\]"),
        ("yt", torch.zeros(3, 6, 5, 3), "batch sizes differ"),
        ("coords", torch.zeros(1, 7, 3), "batch sizes differ"),
        ("xt", torch.zeros(2, 6, 4, 4), "channel counts differ"),
        ("yt", torch.zeros(2, 6, 4, 3), r"yt must be \[B, 6, 5, C\]"),
        ("xt", torch.zeros(2, 6, 5, 3), r"xt must be \[B, 6, 4, C\]"),
        ("xt", torch.zeros(2, 7, 4, 3), r"xt must be \[B, 6, 4, C\]"),
        ("xy", torch.zeros(2, 0, 5, 3), "R0, R1, C >= 1"),
        ("xy", torch.zeros(2, 4, 5, 3, dtype=torch.float16), "planes must share one dtype"),
        ("coords", torch.zeros(2, 7, 3, dtype=torch.long), "coords must be floating point"),
        ("coords", torch.zeros(2, 7, 3, device="meta"), "one device"),
    ],
)
def test_validation_errors(name, value, match):
    inputs = _valid()
    triplane_sample(**inputs)
    inputs[name] = value
    with pytest.raises(ValueError, match=match):
        triplane_sample(**inputs)


# --------------------------------------------------------------------------
# 4. CUDA: the same parity on a GPU (CPU twin: test_triton_matches_reference_cpu)
# --------------------------------------------------------------------------

GPU_CASES = [
    Case(b=4, n=5000, rx=16, ry=16, rt=32, c=8, dtype=dtype, strided=strided)
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
    for strided in (False, True)
] + [
    Case(b=3, n=4097, rx=23, ry=31, rt=40, c=5, dtype=dtype)
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
] + [Case(b=2, n=16384, rx=64, ry=64, rt=64, c=16)]


@requires_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_triton_matches_reference_cuda(case):
    assert_parity(case, seed=case.seed(), device="cuda")


@requires_cuda
@pytest.mark.parametrize("case", DETERMINISM_CASES + [
    Case(b=16, n=4096, rx=16, ry=16, rt=32, c=8, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)
], ids=str)
def test_deterministic_backward_repeats_bit_for_bit_cuda(case):
    assert_deterministic_backward(case, "cuda")


@requires_cuda
@pytest.mark.parametrize("case", GPU_CASES[:6], ids=str)
def test_deterministic_triton_matches_reference_cuda(case):
    assert_parity(case, seed=case.seed(), device="cuda", deterministic=True)


@requires_two_gpus
def test_tensors_on_the_second_gpu_run_there(monkeypatch):
    """Triton launches on the current device: tensors on cuda:1 while cuda:0 is current."""
    case = Case(b=2, n=3000, rx=16, ry=16, rt=32, c=8)
    torch.cuda.set_device(0)
    for deterministic in (False, True):
        assert_parity(case, seed=case.seed(), device="cuda:1", deterministic=deterministic)
    assert torch.cuda.current_device() == 0


@requires_cuda
def test_cuda_dispatch_defaults_to_triton(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    (xy, yt, xt), coords, expected = hand_case()
    xy = xy.cuda().requires_grad_(True)
    out = triplane_sample(xy, yt.cuda(), xt.cuda(), coords.cuda())
    assert "TriplaneSampleFunction" in type(out.grad_fn).__name__
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=1e-5)

