#!/usr/bin/env bash
# Validate everything GPU-specific on one GPU in under 8 minutes, offline: CUDA kernel parity and
# determinism, the kernel benchmark (share of the bandwidth floor), coordtok-l throughput in bf16
# (encode, decode in 16-frame slices, with the compiled decoder) and in fp32 (with TF32), peak
# memory per batch_max_frames through the engine's warm-up (and pinned vs pageable uploads), and a
# service smoke test on cuda:0 (encode, range decode, a generation job, /metrics).
#
#   bash benchmarks/gpu_check.sh                 # GPU mode when CUDA is available, else CPU mode
#   bash benchmarks/gpu_check.sh --cpu           # CPU mode: the same steps, small, on the CPU
#   bash benchmarks/gpu_check.sh --out DIR       # results elsewhere (default benchmarks/results)
#   bash benchmarks/gpu_check.sh --wheels .wheels   # first install these wheels (benchmarks/gpu_wheels.sh)
#
# Needs the project's dependencies importable by $PYTHON (default .venv/bin/python, else python3;
# the repository is importable as `coordtok` through a link in a temporary folder on PYTHONPATH); no network: an image with torch and Triton but without the
# service's dependencies gets them from --wheels, installed into a temporary folder. Each step runs under its own time limit and
# prints one line, `PASS name (seconds)` or `FAIL name (why)`; its output is kept in
# DIR/gpu_check_<machine>_logs/. DIR/gpu_check_<machine>.json sums up the run (machine, mode, steps);
# the steps' own JSON files are DIR/gpu_check_<machine>_<step>.json. Exit status: failed steps.
# CPU mode runs in the test suite (tests/benchmarks/test_gpu_check.py) so that the script never rots.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=auto
OUT=benchmarks/results
while (($#)); do
    case "$1" in
        --cpu) MODE=cpu ;;
        --gpu) MODE=gpu ;;
        --out) OUT="$2"; shift ;;
        --wheels) WHEELS="$2"; shift ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# The repository is the `coordtok` package (pyproject.toml's package-dir): a link named coordtok
# makes it importable without installing it.
PACKAGE_LINK=$(mktemp -d)
ln -s "$PWD" "$PACKAGE_LINK/coordtok"
export PYTHONPATH="$PACKAGE_LINK${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "${WHEELS:-}" ]]; then
    SITE=$(mktemp -d)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl || exit 2
    export PYTHONPATH="$PACKAGE_LINK:$SITE${PYTHONPATH#"$PACKAGE_LINK"}"
fi
if [[ $MODE == auto ]]; then
    if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then MODE=gpu; else MODE=cpu; fi
fi
# The machine's tag: the GPU's model (h100, h200, ...) or cpu; and its memory bandwidth (GB/s).
read -r TAG PEAK_GBPS < <("$PYTHON" - "$MODE" <<'EOF'
import re, sys
import torch
if sys.argv[1] == "cpu":
    print("cpu 0")
else:
    name = torch.cuda.get_device_name(0)
    model = re.search(r"\b([A-Z]+\d+[A-Za-z]*)\b", name.replace("NVIDIA", ""))
    tag = model.group(1).lower() if model else re.sub(r"\W+", "_", name.lower()).strip("_")
    bandwidth = {"h200": 4800, "h100": 2000 if "PCIe" in name else 3350, "a100": 2039}.get(tag, 3350)
    print(tag, bandwidth)
EOF
)
mkdir -p "$OUT"
LOGS="$OUT/gpu_check_${TAG}_logs"
mkdir -p "$LOGS"
STEPS="$LOGS/steps.tsv"
: >"$STEPS"
FAILED=0
result() { echo "$OUT/gpu_check_${TAG}_$1.json"; }

# run_step NAME LIMIT_S COMMAND...: run under `timeout`, print PASS/FAIL, record it.
run_step() {
    local name=$1 limit=$2
    shift 2
    local log="$LOGS/${name// /_}.log" started status why
    started=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    status=$?
    local seconds
    seconds=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if ((status == 0)); then
        echo "PASS $name ($seconds s)"
        printf '%s\tPASS\t%s\t%s\n' "$name" "$seconds" "" >>"$STEPS"
    else
        if ((status == 124 || status == 137)); then why="timed out after $limit s"; else why="exit $status: $(tail -n 1 "$log")"; fi
        echo "FAIL $name ($why; log: $log)"
        printf '%s\tFAIL\t%s\t%s\n' "$name" "$seconds" "$why" >>"$STEPS"
        FAILED=$((FAILED + 1))
    fi
}

if [[ $MODE == gpu ]]; then ENV_LIMIT=15; else ENV_LIMIT=60; fi  # GPU mode: 480 s of limits in all
echo "# gpu_check: $MODE mode, machine $TAG, python $PYTHON, results in $OUT"
run_step "environment" "$ENV_LIMIT" "$PYTHON" -c "
import sys, torch, triton, fastapi, av, safetensors
from benchmarks.common import machine
print(machine())
if '$MODE' == 'gpu':
    assert torch.cuda.is_available(), 'no CUDA device'
    print(torch.cuda.get_device_name(0), torch.version.cuda, torch.cuda.is_bf16_supported())
"
if [[ $MODE == gpu ]]; then
    run_step "kernel parity and determinism" 90 "$PYTHON" -m pytest -q -p no:cacheprovider \
        tests/kernels/test_triplane_sample.py -k cuda
    run_step "kernel bench" 60 "$PYTHON" benchmarks/kernel_bench.py --dtype bf16 \
        --variants reference grid_sample triton triton-deterministic --peak-gbps "$PEAK_GBPS" --json "$(result kernel)"
    run_step "model bf16" 130 "$PYTHON" benchmarks/model_bench.py --preset coordtok-l --dtype bf16 --batch 4 \
        --variants base compiled --json "$(result model_bf16)"
    run_step "model fp32" 45 "$PYTHON" benchmarks/model_bench.py --preset coordtok-l --dtype fp32 --batch 2 \
        --repeats 2 --variants base tf32 --json "$(result model_fp32)"
    run_step "engine memory" 55 "$PYTHON" benchmarks/engine_bench.py --preset coordtok-l --device cuda:0 \
        --batch-frames 128 256 512 1024 --json "$(result engine)"
    run_step "service smoke" 85 "$PYTHON" benchmarks/service_smoke.py --device cuda:0 --timeout 75 --json "$(result smoke)"
else  # generous limits: a CPU shared with other work may be slow, and no time budget applies
    run_step "kernel parity and determinism" 300 "$PYTHON" -m pytest -q -p no:cacheprovider \
        tests/kernels/test_triplane_sample.py -k "hand_computed or deterministic_backward_repeats_bit_for_bit_cpu"
    run_step "kernel bench" 180 "$PYTHON" benchmarks/kernel_bench.py --quick --batch 2 \
        --variants reference grid_sample --json "$(result kernel)"
    run_step "model bf16" 240 "$PYTHON" benchmarks/model_bench.py --preset coordtok-tiny --device cpu --dtype bf16 \
        --batch 1 --repeats 1 --json "$(result model_bf16)"
    run_step "model fp32" 240 "$PYTHON" benchmarks/model_bench.py --preset coordtok-tiny --device cpu --dtype fp32 \
        --batch 1 --repeats 1 --json "$(result model_fp32)"
    run_step "engine memory" 180 "$PYTHON" benchmarks/engine_bench.py --preset coordtok-tiny --device cpu \
        --batch-frames 128 --json "$(result engine)"
    run_step "service smoke" 240 "$PYTHON" benchmarks/service_smoke.py --device cpu --timeout 200 --json "$(result smoke)"
fi

"$PYTHON" - "$STEPS" "$OUT/gpu_check_${TAG}.json" "$MODE" "$TAG" <<'EOF'
import json, sys
from pathlib import Path
from benchmarks.common import machine
steps_file, summary, mode, tag = sys.argv[1:]
steps = []
for line in Path(steps_file).read_text().splitlines():
    name, status, seconds, why = line.split("\t")
    steps.append({"step": name, "status": status, "seconds": float(seconds), **({"why": why} if why else {})})
Path(summary).write_text(json.dumps({"benchmark": "gpu_check", "mode": mode, "machine_tag": tag,
                                     "machine": machine(), "steps": steps}, indent=2) + "\n")
print(f"wrote {summary}")
EOF
exit "$FAILED"
