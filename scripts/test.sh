#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite against the real ComfyUI. Extra args go to pytest.
# The web UI tests need Chromium: where it is missing and Debian's apt-get can run (as root or with password-less
# sudo) it is installed; elsewhere those tests are skipped with a message (GL_NO_SYSTEM_PACKAGES=1 never installs).
set -euo pipefail
PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mapfile -t out < <(bash "$PACK_DIR/scripts/setup.sh" | tail -n 2)
PY="${out[0]}"; export GL_COMFYUI_ROOT="${out[1]}"
if [ -z "${GL_NO_SYSTEM_PACKAGES:-}" ] && [ -z "${GL_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 \
        && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    if [ -z "$SUDO" ] || sudo -n true 2>/dev/null; then
        echo "installing Debian's chromium for the web UI tests" >&2
        $SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
            || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium >/dev/null 2>&1; } \
            || echo "could not install chromium; the web UI tests will be skipped" >&2
    fi
fi
cd "$PACK_DIR"
"$PY" -m ruff check .
exec "$PY" -m pytest "$@"
