#!/usr/bin/env bash
# Set up .venv if needed, then run an encode/decode round trip of a generated clip.
# Extra arguments go to `coordtok roundtrip` (see `coordtok roundtrip --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# No bundled default model yet: the random-weight coordtok-tiny preset shows the pipeline.
[ $# -gt 0 ] || set -- --model coordtok-tiny
exec .venv/bin/coordtok roundtrip "$@"
