#!/usr/bin/env bash
# Create the TPU VM of settings.env: on-demand, spot, preemptible, or as a queued resource
# (CAPACITY). Usage: tpu_scripts/create.sh [--settings FILE] [--dry-run]

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
init "$@"
no_args
require ACCELERATOR_TYPE RUNTIME_VERSION

# Extra create flags from the settings, split into words.
read -r -a extra <<<"$CREATE_FLAGS"

case $CAPACITY in
  on-demand | queued) capacity=() ;;
  spot | queued-spot) capacity=(--spot) ;;
  preemptible) capacity=(--preemptible) ;;
esac

if [[ $CAPACITY == queued* ]]; then
  run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
    --project="$PROJECT" --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" \
    --runtime-version="$RUNTIME_VERSION" ${capacity[@]+"${capacity[@]}"} ${extra[@]+"${extra[@]}"}
  note "queued; the TPU exists once this says ACTIVE:" \
    "gcloud compute tpus queued-resources describe $TPU_NAME --project=$PROJECT --zone=$ZONE"
else
  tpu_vm create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" ${capacity[@]+"${capacity[@]}"} ${extra[@]+"${extra[@]}"}
fi
