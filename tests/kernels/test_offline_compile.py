"""The triplane kernels compile for sm_80 and sm_90 without spilling, on this machine's Triton and on
Triton 3.6 (the lent GPU machines' version), with no GPU: see tests/kernels/offline_compile.py.

Triton 3.6 is looked for in ``.venv/triton-3.6`` (``scripts/test.sh`` installs it there with
``pip install --no-deps --target``; it installs beside CPU torch without conflict) or in the folder
named by ``COORDTOK_TRITON_36``; without it the test is skipped here and fails in CI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernels import offline_compile
from tests.system_tools import require

ROOT = Path(__file__).resolve().parents[2]
TRITON_36 = Path(os.environ.get("COORDTOK_TRITON_36", ROOT / ".venv" / "triton-3.6"))
KERNELS = {"_triplane_fwd_kernel", "_triplane_bwd_kernel", "_plane_grad_kernel"}


def check(reports: list[dict]) -> None:
    compiled = {(r["kernel"], r["arch"], r["dtype"], r["c"]) for r in reports}
    assert compiled == {(k, arch, dtype, c) for k in KERNELS for arch in offline_compile.ARCHS
                        for dtype in offline_compile.DTYPES for c in offline_compile.CHANNELS}
    spilling = [r for r in reports if r["spill_stores"] or r["spill_loads"]]
    assert spilling == []
    # Eight channels of a corner are one aligned vector: the forward reads them with vector loads.
    assert all(r["vector_loads"] > 0 for r in reports if r["kernel"] == "_triplane_fwd_kernel" and r["c"] == 8)


def test_kernels_compile_without_spills_on_the_installed_triton():
    check([vars(report) for report in offline_compile.reports()])


def test_kernels_compile_without_spills_on_triton_3_6():
    require((TRITON_36 / "triton" / "__init__.py").is_file(), f"Triton 3.6 in {TRITON_36}",
            f"python -m pip install --no-deps --target {TRITON_36} triton==3.6.0")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TRITON_36), str(ROOT)])}
    done = subprocess.run([sys.executable, "-m", "tests.kernels.offline_compile"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(line) for line in done.stdout.splitlines()]
    assert {r["triton"] for r in reports} == {"3.6.0"}
    check(reports)
