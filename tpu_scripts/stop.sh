#!/usr/bin/env bash
# Stop training on every worker: SIGTERM to the process in ~/LOG_DIR/train.pid, SIGKILL if it
# is still there after 30 s. Checkpoints already in WORKDIR stay; launch.sh resumes from them.
# Usage: tpu_scripts/stop.sh [--settings FILE] [--dry-run]

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
init "$@"
no_args

pid="\$HOME/$LOG_DIR/train.pid"
steps=(
  "if [ ! -f $pid ]; then echo \$(hostname): not running; exit 0; fi"
  "p=\$(cat $pid)"
  "kill \$p 2>/dev/null || true"
  "for i in \$(seq 30); do kill -0 \$p 2>/dev/null || break; sleep 1; done"
  "kill -9 \$p 2>/dev/null || true"
  "rm -f $pid"
  "echo \$(hostname): stopped"
)
on_workers all "$(remote_script "${steps[@]}")"
