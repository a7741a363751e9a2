#!/usr/bin/env bash
# Set up (idempotent) and run the demo: every workflow in workflows/ on a headless ComfyUI server (CPU),
# images copied to ./demo_output/<workflow>/. The server is then stopped. If the demo model's weights are there
# (demo/weights/demo_model.safetensors), a quick evaluation follows (bench/quality.py --quick: CFG at several
# scales, APG and CFG++ on held-out prompts, through the same ComfyUI nodes, in-process): a comparison grid
# ./demo_output/grid.png (methods × prompts) and a metrics table ./demo_output/metrics.md (raw: metrics.json).
#
# The server gets a throw-away --base-directory whose custom_nodes/ holds only this pack (symlinked), so a
# ComfyUI of your own (COMFYUI_PATH=...) runs with none of your other packs, models or outputs touched. Its
# extra_model_paths.yaml, if any, is still read by ComfyUI (a broken one stops the server).
#
# Environment: COMFYUI_PATH, GL_HOME, GL_PYTHON (see scripts/setup.sh); GL_DEMO_PORT (default: a free port);
# GL_DEMO_EVAL=0 skips the quick evaluation; GL_DEMO_THREADS: its CPU threads (default: all cores).
set -euo pipefail

PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$PACK_DIR/demo_output"
log() { printf '[demo] %s\n' "$*" >&2; }

mapfile -t setup < <(bash "$PACK_DIR/scripts/setup.sh" | tail -n 2)
PY="${setup[0]}"; COMFY="${setup[1]}"
[ -x "$PY" ] && [ -f "$COMFY/main.py" ] || { log "scripts/setup.sh did not report a Python and a ComfyUI root"; exit 1; }

PORT="${GL_DEMO_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
URL="http://127.0.0.1:$PORT"
BASE="$(mktemp -d "${TMPDIR:-/tmp}/guidance-lab-demo.XXXXXX")"
mkdir -p "$BASE/custom_nodes"
ln -s "$PACK_DIR" "$BASE/custom_nodes/guidance_lab"

SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    log "stopping the server (pid $SERVER_PID)"
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
cleanup() {
  stop_server
  rm -rf "$BASE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "starting ComfyUI ($COMFY) on $URL, log: $BASE/server.log"
# the demo's tiny models gain nothing from several CPU threads (and OpenMP stalls on busy machines)
(cd "$COMFY" && exec env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$PY" main.py --cpu --listen 127.0.0.1 \
   --port "$PORT" --disable-auto-launch --disable-api-nodes --base-directory "$BASE" \
   --database-url sqlite:///:memory: >"$BASE/server.log" 2>&1) &
SERVER_PID=$!

if ! "$PY" "$PACK_DIR/scripts/workflow_api.py" wait --server "$URL" --timeout 300 --pid "$SERVER_PID" >/dev/null; then
  log "the server did not start; last lines of its log:"; tail -n 40 "$BASE/server.log" >&2; exit 1
fi
if grep -E "IMPORT FAILED.*guidance_lab|Cannot import .*guidance_lab|Error while calling comfy_entrypoint" "$BASE/server.log" >&2; then
  log "Guidance Lab failed to import (log above)"; exit 1
fi

rm -rf "$OUT"; mkdir -p "$OUT"
status=0
"$PY" "$PACK_DIR/scripts/workflow_api.py" run --server "$URL" --out "$OUT" "$PACK_DIR"/workflows/*.json || status=$?
stop_server   # the evaluation below runs in its own process; free the cores and the memory first

# Quick evaluation on the demo model: comparison grid + metrics table (about 2-3 minutes on 2 CPU cores).
WEIGHTS="$PACK_DIR/demo/weights/demo_model.safetensors"
eval_status=0
if [ "${GL_DEMO_EVAL:-1}" = "0" ]; then
  log "GL_DEMO_EVAL=0: skipping the quick evaluation (grid and metrics table)"
elif [ ! -f "$WEIGHTS" ]; then
  log "NOTE: the demo model weights are missing ($WEIGHTS), so there is no comparison grid and no metrics table."
  log "      Train them with: $PY $PACK_DIR/demo/train.py   (about 1-2 hours on 2 CPU cores; see --help),"
  log "      or copy trained files into demo/weights/; then run this script again."
else
  log "quick evaluation on the demo model: bench/quality.py --quick (grid and metrics table)"
  printf '# Guidance Lab demo: quick evaluation of guidance methods\n\nWritten by scripts/demo.sh (bench/quality.py --quick; the full benchmark is in BENCHMARKS.md).\n' >"$OUT/metrics.md"
  (cd "$PACK_DIR" && GL_COMFYUI_ROOT="$COMFY" "$PY" bench/quality.py --quick --weights "$WEIGHTS" \
     --threads "${GL_DEMO_THREADS:-$(nproc 2>/dev/null || echo 2)}" \
     --grid "$OUT/grid.png" --out "$OUT/metrics.md" --json "$OUT/metrics.json") || eval_status=$?
  if [ "$eval_status" -ne 0 ]; then
    log "the quick evaluation failed (exit $eval_status)"; [ "$status" -ne 0 ] || status=$eval_status
  fi
fi

echo "Demo images are in $OUT:"
find "$OUT" -type f -name '*.png' | sort
if [ -f "$OUT/metrics.md" ] && [ "$eval_status" -eq 0 ] && [ -f "$OUT/grid.png" ]; then
  echo "Comparison grid (methods x prompts): $OUT/grid.png"
  echo "Metrics table: $OUT/metrics.md"
fi
exit "$status"
