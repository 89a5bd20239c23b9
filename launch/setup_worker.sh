#!/usr/bin/env bash
# Sets up one worker (a TPU VM, a GPU node) from the same pins as everywhere else:
#   launch/setup_worker.sh tpu|cuda12|cpu [REPO_DIR]
# Creates REPO_DIR/.venv if missing and installs the project with the accelerator's extra,
# constrained by constraints.txt (so jax/jaxlib/libtpu match the tested versions). Idempotent:
# a second run with the same pins reinstalls nothing. IDGBR_PYTHON picks the interpreter
# (default python3, >= 3.10); IDGBR_DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
ACCEL=${1:?usage: setup_worker.sh tpu|cuda12|cpu [REPO_DIR]}
REPO_DIR=${2:-$(cd "$(dirname "$0")/.." && pwd)}
PYTHON=${IDGBR_PYTHON:-python3}
case "$ACCEL" in
  tpu|cuda12) TARGET=".[$ACCEL]" ;;
  cpu) TARGET="." ;;
  *) echo "setup_worker.sh: unknown accelerator '$ACCEL' (tpu, cuda12 or cpu)" >&2; exit 2 ;;
esac
run() { if [[ "${IDGBR_DRY_RUN:-0}" == 1 ]]; then echo "+ $*"; else "$@"; fi; }
cd "$REPO_DIR"
[[ -f constraints.txt && -f setup.cfg ]] || { echo "setup_worker.sh: $REPO_DIR is not an idgbr-jax checkout" >&2; exit 2; }
STAMP=".venv/.stamp-$ACCEL-$(cat setup.cfg setup.py constraints.txt 2>/dev/null | cksum | cut -d' ' -f1)"
if [[ -f "$STAMP" ]]; then echo "worker $(hostname): .venv up to date ($ACCEL)"; exit 0; fi
[[ -x .venv/bin/python ]] || run "$PYTHON" -m venv .venv
run .venv/bin/pip install -q --upgrade pip
run .venv/bin/pip install -q -c constraints.txt -e "$TARGET"
run touch "$STAMP"
run .venv/bin/python -c "import jax; print(jax.local_devices())"
