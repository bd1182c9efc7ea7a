#!/usr/bin/env bash
# Follow the training log of one worker (default 0, the one that reports metrics); Ctrl-C to
# leave, training goes on. Usage: tpu_scripts/logs.sh [--settings FILE] [--dry-run] [WORKER]

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
init "$@"
worker=${ARGS[0]:-0}
((${#ARGS[@]} <= 1)) || die "unexpected argument: ${ARGS[1]} (see --help)"
[[ $worker =~ ^[0-9]+$ ]] || die "WORKER must be a worker number, not '$worker'"

on_workers "$worker" "tail -n 200 -F \$HOME/$LOG_DIR/train.log"
