#!/usr/bin/env bash
# A Cloud TPU VM pod slice, every worker, from this checkout:
#   TPU_NAME=my-v5e-16 ZONE=us-west4-a launch/tpu_pod.sh setup        # once (idempotent)
#   TPU_NAME=my-v5e-16 ZONE=us-west4-a launch/tpu_pod.sh run train \
#     --config=configs/stage2_synthetic.py --workdir=gs://bucket/runs/s2 --config.mesh_shape.fsdp=4
# `setup` copies this checkout (its non-ignored files) to REPO_DIR on every worker and runs
# launch/setup_worker.sh tpu there (a venv from constraints.txt with jax[tpu]). `run` starts the
# same idgbr command on every worker with IDGBR_DISTRIBUTED=1 (jax.distributed finds the pod by
# itself); checkpoints and logs go to the --workdir bucket, shared by all workers. A preempted
# (spot) slice gets SIGTERM: the run saves at the next step and exits 0; `run` again resumes.
# GCLOUD overrides the gcloud binary (the tests use a stand-in).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
GCLOUD=${GCLOUD:-gcloud}
REPO_DIR=${REPO_DIR:-idgbr-jax}   # relative to each worker's home directory
ACTION=${1:?usage: tpu_pod.sh setup | run <idgbr command and flags>}
shift
HERE=$(cd "$(dirname "$0")/.." && pwd)
ssh_all() {
  "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}
case "$ACTION" in
  setup)
    TARBALL=$(mktemp -d)/idgbr-jax.tar.gz
    # The checkout as it is: tracked and untracked-but-not-ignored files that exist (no .venv).
    (cd "$HERE" && git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done |
      tar --null -czf "$TARBALL" -T -)
    "$GCLOUD" compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:idgbr-jax.tar.gz" --zone "$ZONE" \
      --worker=all
    ssh_all "mkdir -p $REPO_DIR && tar -xzf idgbr-jax.tar.gz -C $REPO_DIR && bash $REPO_DIR/launch/setup_worker.sh tpu $REPO_DIR"
    ;;
  run)
    ARGS=$(printf ' %q' "$@")
    ssh_all "cd $REPO_DIR && IDGBR_DISTRIBUTED=1 .venv/bin/idgbr$ARGS"
    ;;
  *) echo "tpu_pod.sh: unknown action '$ACTION' (setup or run)" >&2; exit 2 ;;
esac
