"""benchmarks/gpu_check.sh in CPU mode: every step runs (small, on the CPU) and passes, and the
summary names the machine, so that the GPU run never meets a script that rotted."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["environment", "kernel parity and determinism", "kernel bench", "model bf16", "model fp32",
         "engine memory", "service smoke"]


def test_gpu_check_cpu_mode_passes_every_step(tmp_path):
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", "--out", str(tmp_path)], cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=1500)
    lines = [line for line in done.stdout.splitlines() if line.startswith(("PASS ", "FAIL "))]
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line.split(" (")[0] for line in lines] == [f"PASS {step}" for step in STEPS]
    summary = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert summary["mode"] == "cpu" and summary["machine"]["device"].startswith("CPU: ")
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [(step, "PASS") for step in STEPS]
    for name in ("kernel", "model_bf16", "model_fp32", "engine", "smoke"):
        result = json.loads((tmp_path / f"gpu_check_cpu_{name}.json").read_text())
        assert result["rows"] and result["machine"]["device"].startswith("CPU: ")
    smoke = json.loads((tmp_path / "gpu_check_cpu_smoke.json").read_text())["rows"]
    assert {row["check"] for row in smoke} == {"start", "encode", "range decode", "generation job", "metrics"}
