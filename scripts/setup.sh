#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install the project into it.
# TORCH_SPEC picks the torch build (default: the 2.13.0 release; on a GPU machine a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[test]"
