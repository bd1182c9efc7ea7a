#!/usr/bin/env bash
# Delete the TPU VM (for a queued resource: the request and its TPU). Training state is safe
# in WORKDIR; the logs on the workers are lost.
# Usage: tpu_scripts/delete.sh [--settings FILE] [--dry-run]

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
init "$@"
no_args

if [[ $CAPACITY == queued* ]]; then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" --project="$PROJECT" \
    --zone="$ZONE" --force --quiet
else
  tpu_vm delete "$TPU_NAME" --quiet
fi
