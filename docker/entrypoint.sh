#!/bin/sh
# The images' entry point: `coordtok serve` on $COORDTOK_PORT (8000), arguments passed through.
# Models: $COORDTOK_MODELS_DIR/tokenizer.safetensors and generator.safetensors (a volume on /models)
# when they are there and COORDTOK_MODEL / COORDTOK_GENERATOR are not set; else the bundled ones.
# `entrypoint.sh healthcheck` exits 0 when the server on $COORDTOK_PORT is ready (HEALTHCHECK).
set -eu
port=${COORDTOK_PORT:-8000}
if [ "${1:-}" = healthcheck ]; then
    exec python -c 'import sys, urllib.request
try:
    urllib.request.urlopen("http://127.0.0.1:" + sys.argv[1] + "/readyz", timeout=5)
except Exception as error:
    sys.exit("not ready: %s" % error)' "$port"
fi
models=${COORDTOK_MODELS_DIR:-/models}
if [ -z "${COORDTOK_MODEL:-}" ] && [ -f "$models/tokenizer.safetensors" ]; then
    export COORDTOK_MODEL="$models/tokenizer.safetensors"
fi
if [ -z "${COORDTOK_GENERATOR:-}" ] && [ -f "$models/generator.safetensors" ]; then
    export COORDTOK_GENERATOR="$models/generator.safetensors"
fi
exec coordtok serve --host "${COORDTOK_HOST:-0.0.0.0}" --port "$port" "$@"
