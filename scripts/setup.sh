#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install the project into it.
# TORCH_SPEC picks the torch build (default: the 2.13.0 release; on a GPU machine a CUDA build).
# When pyproject.toml and TORCH_SPEC are what they were at the last install (their hash is kept in
# .venv/.coordtok-installed), nothing is installed: starting a second server leaves alone the venv
# a running one uses.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.coordtok-installed
wanted="$({ cat pyproject.toml; echo "TORCH_SPEC=${TORCH_SPEC:-}"; } | sha256sum | cut -d' ' -f1)"
if [[ -x .venv/bin/python && -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
    exit 0
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[test]"
echo "$wanted" > "$stamp"
