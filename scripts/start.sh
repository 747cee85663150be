#!/usr/bin/env bash
# Set up .venv if needed, then start the server on the bundled default tokenizer.
# Extra arguments go to `coordtok serve` (see `coordtok serve --help`); settings: COORDTOK_* variables.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/coordtok serve "$@"
