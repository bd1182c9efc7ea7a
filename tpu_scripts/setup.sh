#!/usr/bin/env bash
# Put this package on every worker and install it with the TPU build of jax, in a virtual
# environment (VENV_DIR) with Python PYTHON_VERSION. The code is this checkout, copied, or
# REPO_URL at REPO_REF, cloned. Safe to rerun, e.g. after changing the code.
# Usage: tpu_scripts/setup.sh [--settings FILE] [--dry-run]

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
init "$@"
no_args
require PYTHON_VERSION

# 1. The code, into ~/REMOTE_DIR.
if [[ -n $REPO_URL ]]; then
  require REPO_REF
  fetch="rm -rf $REMOTE_DIR && git clone -q $(quote "$REPO_URL") $REMOTE_DIR"
  fetch+=" && git -C $REMOTE_DIR checkout -q $(quote "$REPO_REF")"
else
  archive="${TMPDIR:-/tmp}/$TPU_NAME-code.tar.gz"
  run tar -czf "$archive" --exclude=.git --exclude=./workdir --exclude=.venv \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache \
    -C "$(dirname "$SCRIPTS_DIR")" .
  tpu_vm scp "$archive" "$TPU_NAME:$REMOTE_DIR.tar.gz" --worker=all
  fetch="rm -rf $REMOTE_DIR && mkdir $REMOTE_DIR && tar -xzf $REMOTE_DIR.tar.gz -C $REMOTE_DIR"
fi

# 2. A virtual environment (uv brings the Python), jax for TPU, this package; then check that
# every worker sees the whole slice.
pip="$VENV_DIR/bin/pip"
steps=(
  "set -e"
  "$fetch"
  "[ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh"
  "[ -x $VENV_DIR/bin/python ] || ~/.local/bin/uv venv -q --seed --python $(quote "$PYTHON_VERSION") $VENV_DIR"
  "$pip install -q -U pip"
  "$pip install -q -U \"jax[tpu]\""
  "$pip install -q -e $REMOTE_DIR"
  "$VENV_DIR/bin/python -c 'import jax, lima_jax; print(jax.process_index(), jax.device_count(), \"devices\")'"
)
on_workers all "$(remote_script "${steps[@]}")"
