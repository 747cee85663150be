"""Triplane bilinear sampling for the CoordTok decoder.

:func:`triplane_sample` validates its inputs and dispatches to one of two
backends with identical semantics (see :mod:`kernels.reference`):

* ``reference``: pure PyTorch, any device, differentiable through autograd.
* ``triton``: fused Triton forward/backward (:mod:`kernels.triton_triplane`).
  CUDA tensors run the compiled kernels; CPU tensors run the same kernels in
  Triton's interpreter (exact but slow: this is how the tests exercise them on
  any machine).

The backend is chosen per call: the ``backend=`` keyword if given, else the
environment variable ``COORDTOK_TRIPLANE_BACKEND`` (read at every call), else
``auto``. ``auto`` sends CUDA tensors to Triton (if importable) and everything
else to the reference. Neither backend gives ``coords`` a gradient.

The Triton backward adds its contributions with atomics unless a deterministic
backward is asked for: ``deterministic=True``, or (when the keyword is not
given) ``torch.use_deterministic_algorithms(True)`` or
``COORDTOK_TRIPLANE_DETERMINISTIC=1``; it then reduces in a fixed order and
gives the same bits on every run. (The reference's backward follows torch's
own deterministic setting.)
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from coordtok.kernels.reference import triplane_sample_reference

__all__ = ["triplane_sample", "triplane_sample_reference", "BACKEND_ENV", "BACKENDS", "DETERMINISTIC_ENV"]

BACKEND_ENV = "COORDTOK_TRIPLANE_BACKEND"
BACKENDS = ("auto", "triton", "reference")
DETERMINISTIC_ENV = "COORDTOK_TRIPLANE_DETERMINISTIC"


def triplane_sample(
    xy: Tensor, yt: Tensor, xt: Tensor, coords: Tensor, *, backend: str | None = None,
    deterministic: bool | None = None,
) -> Tensor:
    """Sample three feature planes at video coordinates.

    Args:
        xy: [B, Rx, Ry, C] plane indexed by (x, y).
        yt: [B, Rt, Ry, C] plane indexed by (t, y).
        xt: [B, Rt, Rx, C] plane indexed by (t, x).
        coords: [B, N, 3] float, columns (t, x, y), each in [0, 1].
        backend: ``"auto"``, ``"triton"`` or ``"reference"``; overrides
            ``COORDTOK_TRIPLANE_BACKEND`` when given.
        deterministic: the Triton backward's reduction order is fixed (same
            bits every run); default: ``torch.are_deterministic_algorithms_enabled()``
            or ``COORDTOK_TRIPLANE_DETERMINISTIC=1``.

    Returns:
        [B, N, 3C] in the planes' dtype: ``[xy(x, y), yt(t, y), xt(t, x)]``,
        each an align-corners bilinear sample.

    Raises:
        ValueError: malformed inputs or an unknown backend name.
        RuntimeError: the Triton backend was forced but cannot run here.
    """
    _validate(xy, yt, xt, coords)
    if _resolve_backend(backend, coords.device) == "reference":
        return triplane_sample_reference(xy, yt, xt, coords)
    triton_impl = _load_triton(coords.device)
    if xy.dtype not in triton_impl.SUPPORTED_DTYPES:
        raise ValueError(
            f"the triton backend supports planes of dtype float32, bfloat16 or float16, "
            f"got {xy.dtype}; use backend='reference' for other dtypes"
        )
    return triton_impl.triplane_sample_triton(xy, yt, xt, coords, _resolve_deterministic(deterministic))


def _resolve_deterministic(deterministic: bool | None) -> bool:
    if deterministic is not None:
        return bool(deterministic)
    flag = os.environ.get(DETERMINISTIC_ENV, "").strip().lower()
    if flag not in ("", "0", "1", "false", "true"):
        raise ValueError(f"${DETERMINISTIC_ENV} must be 0 or 1, got {flag!r}")
    return torch.are_deterministic_algorithms_enabled() or flag in ("1", "true")


def _resolve_backend(backend: str | None, device: torch.device) -> str:
    """Return ``"triton"`` or ``"reference"`` for this call."""
    source = "backend=" if backend is not None else f"${BACKEND_ENV}"
    name = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    name = name.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        return name
    if device.type == "cuda" and _triton_importable():
        return "triton"
    return "reference"


def _triton_importable() -> bool:
    try:
        import coordtok.kernels.triton_triplane  # noqa: F401
    except ImportError:
        return False
    return True


def _load_triton(device: torch.device):
    """Import the Triton backend and check that it can run on ``device``."""
    try:
        import coordtok.kernels.triton_triplane as triton_impl
    except ImportError as exc:
        raise RuntimeError(
            f"the triton backend was requested but Triton is not importable ({exc}); "
            f"install triton or set {BACKEND_ENV}=reference"
        ) from exc
    if device.type in ("cuda", "cpu"):
        return triton_impl
    raise RuntimeError(
        f"the triton backend runs CUDA tensors (compiled) and CPU tensors (in Triton's "
        f"interpreter), got {device.type} tensors; set {BACKEND_ENV}=reference (or "
        f"backend='reference')"
    )


def _validate(xy: Tensor, yt: Tensor, xt: Tensor, coords: Tensor) -> None:
    """Raise ValueError unless the inputs form a consistent triplane query."""
    named = {"xy": xy, "yt": yt, "xt": xt, "coords": coords}
    for name, tensor in named.items():
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {tensor.dtype}")
    for name, plane in (("xy", xy), ("yt", yt), ("xt", xt)):
        if plane.dim() != 4:
            raise ValueError(
                f"{name} must have shape [B, R0, R1, C] (4 dims), got {tuple(plane.shape)}"
            )
        if min(plane.shape[1:]) < 1:
            raise ValueError(f"{name} must have R0, R1, C >= 1, got {tuple(plane.shape)}")
    if coords.dim() != 3 or coords.shape[-1] != 3:
        raise ValueError(
            f"coords must have shape [B, N, 3] with columns (t, x, y), got {tuple(coords.shape)}"
        )
    batch = {name: tensor.shape[0] for name, tensor in named.items()}
    if len(set(batch.values())) != 1:
        raise ValueError(f"batch sizes differ: {batch}")
    channels = {"xy": xy.shape[3], "yt": yt.shape[3], "xt": xt.shape[3]}
    if len(set(channels.values())) != 1:
        raise ValueError(f"plane channel counts differ: {channels}")
    rx, ry = xy.shape[1], xy.shape[2]
    expected = {"yt": (yt.shape[1], ry), "xt": (yt.shape[1], rx)}
    for name, plane in (("yt", yt), ("xt", xt)):
        if tuple(plane.shape[1:3]) != expected[name]:
            raise ValueError(
                f"plane resolutions disagree: xy is [B, Rx={rx}, Ry={ry}, C] and yt is "
                f"[B, Rt={yt.shape[1]}, Ry, C], so {name} must be [B, {expected[name][0]}, "
                f"{expected[name][1]}, C], got {tuple(plane.shape)}"
            )
    devices = {name: str(tensor.device) for name, tensor in named.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")
    dtypes = {"xy": xy.dtype, "yt": yt.dtype, "xt": xt.dtype}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"planes must share one dtype, got {dtypes}")
