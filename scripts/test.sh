#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite against the real ComfyUI. Extra args go to pytest.
set -euo pipefail
PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mapfile -t out < <(bash "$PACK_DIR/scripts/setup.sh" | tail -n 2)
PY="${out[0]}"; export GL_COMFYUI_ROOT="${out[1]}"
cd "$PACK_DIR"
"$PY" -m ruff check .
exec "$PY" -m pytest "$@"
