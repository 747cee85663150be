#!/bin/sh
# The install steps of both images (docker/Dockerfile, docker/Dockerfile.cpu), run with the `python`
# on PATH; tests/deploy/test_image_install.py runs them too, in a fresh virtual environment.
#   install.sh deps           torch from $TORCH_INDEX (the PyTorch index of a CUDA or the CPU
#                             build; skipped when empty), then the pins of docker/requirements.txt
#   install.sh project SRC    the project from its source folder (not editable), then `pip check`
set -eu
here=$(dirname "$0")
install="python -m pip install --no-cache-dir --disable-pip-version-check"
case "${1:-}" in
deps)
    if [ -n "${TORCH_INDEX:-}" ]; then
        $install --index-url "$TORCH_INDEX" "$(grep -E '^torch==' "$here/requirements.txt")"
    fi
    $install --requirement "$here/requirements.txt"
    ;;
project)
    $install --no-deps --no-build-isolation "${2:?usage: install.sh project SRC}"
    python -m pip check
    ;;
*)
    echo "usage: install.sh deps | project SRC" >&2
    exit 2
    ;;
esac
