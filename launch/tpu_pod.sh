#!/usr/bin/env bash
# Run an idgbr command on every worker of a TPU VM pod slice.
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh train \
#     --config=configs/stage1_synthetic.py --workdir=gs://bucket/runs/s1 --config.mesh_shape.fsdp=4
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-~/idgbr-jax}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $REPO_DIR && IDGBR_DISTRIBUTED=1 .venv/bin/idgbr$ARGS"
