#!/usr/bin/env bash
# Download, here (with network), the wheels of the project's dependencies that a GPU machine's
# image with torch and Triton preinstalled may lack, for its Python, into .wheels/ (git-ignored);
# `bash benchmarks/gpu_check.sh --wheels .wheels` installs them there into a temporary folder,
# with no network. Versions are those of this checkout's .venv, so they agree with each other.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION [DIR]]     # default 3.12 .wheels
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-3.12}
DIR=${2:-.wheels}
PACKAGES=(fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv typing-inspection
          annotated-types annotated-doc av uvicorn python-multipart opentelemetry-api)
pins=()
for name in "${PACKAGES[@]}"; do
    pins+=("$name==$(.venv/bin/python -m pip show "$name" | sed -n 's/^Version: //p')")
done
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$VERSION" --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d "$DIR" "${pins[@]}"
du -sh "$DIR"
