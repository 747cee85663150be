#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Triton 3.6, the lent GPU machines' version, beside the project's own (--target keeps it out of
# the venv's site-packages; it installs beside CPU torch without conflict): the offline-compile test
# compiles the kernels with it too (tests/kernels/test_offline_compile.py).
[[ -f .venv/triton-3.6/triton/__init__.py ]] || .venv/bin/python -m pip install -q --no-deps --target .venv/triton-3.6 triton==3.6.0
exec .venv/bin/python -m pytest -q "$@"
