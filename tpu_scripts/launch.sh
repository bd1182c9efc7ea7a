#!/usr/bin/env bash
# Start training on every worker: python -m lima_jax.train --config=CONFIG --workdir=WORKDIR
# TRAIN_FLAGS [more flags after --], detached with nohup so it outlives the ssh session. Each
# worker appends its output to ~/LOG_DIR/train.log and keeps the process id in train.pid.
# Relaunching after a stop or a preemption resumes from the latest checkpoint in WORKDIR.
# Usage: tpu_scripts/launch.sh [--settings FILE] [--dry-run] [-- TRAIN_FLAG...]
#   e.g. tpu_scripts/launch.sh -- --config.train.stop_after_steps=10

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
init "$@"
require CONFIG WORKDIR
[[ $TRAIN_FLAGS != *YOUR_* ]] ||
  die "setting TRAIN_FLAGS still has a placeholder: edit $SETTINGS or export TRAIN_FLAGS=..."

train="\$HOME/$VENV_DIR/bin/python -m lima_jax.train --config=$(quote "$CONFIG")"
train+=" --workdir=$(quote "$WORKDIR")${TRAIN_FLAGS:+ $TRAIN_FLAGS}"
for flag in ${ARGS[@]+"${ARGS[@]}"}; do train+=" $(quote "$flag")"; done

log="\$HOME/$LOG_DIR/train.log"
pid="\$HOME/$LOG_DIR/train.pid"
steps=(
  "set -e"
  "cd $REMOTE_DIR"
  "mkdir -p \$HOME/$LOG_DIR"
  "if [ -f $pid ] && kill -0 \$(cat $pid) 2>/dev/null; then echo \$(hostname): already running; exit 1; fi"
  "nohup $train >>$log 2>&1 </dev/null & echo \$! >$pid"
  "echo \$(hostname): started, logging to $log"
)
on_workers all "$(remote_script "${steps[@]}")"
