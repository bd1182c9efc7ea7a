# shellcheck shell=bash
# Sourced by every tpu_scripts/*.sh: options, settings, and `run`, which prints each command and,
# with --dry-run (or DRY_RUN=1), only prints it.

set -euo pipefail

SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SETTINGS=${SETTINGS:-$SCRIPTS_DIR/settings.env}
DRY_RUN=${DRY_RUN:-0}
ARGS=()  # positional arguments, and everything after `--`

# Every name settings.env may set; an environment variable of the same name wins over the file.
SETTING_NAMES=(PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION CAPACITY CREATE_FLAGS
  REPO_URL REPO_REF PYTHON_VERSION WORKDIR CONFIG TRAIN_FLAGS REMOTE_DIR VENV_DIR LOG_DIR)

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 1
}

note() {
  echo "$(basename "$0"): $*" >&2
}

usage() {
  # The script's header comment (the lines after the shebang) is its help text.
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
  echo "Options: --settings FILE (default tpu_scripts/settings.env), --dry-run, --help"
}

parse_args() {
  while (($#)); do
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      --settings) (($# >= 2)) || die "--settings needs a file"; SETTINGS=$2; shift ;;
      --settings=*) SETTINGS=${1#*=} ;;
      -h | --help) usage; exit 0 ;;
      --) shift; ARGS+=("$@"); break ;;
      -*) die "unknown option: $1 (see --help)" ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}

load_settings() {
  [[ -f $SETTINGS ]] || die "settings file not found: $SETTINGS"
  local name
  for name in "${SETTING_NAMES[@]}"; do  # keep what the environment sets
    if [[ -n ${!name+set} ]]; then printf -v "env_$name" '%s' "${!name}"; fi
  done
  # shellcheck source=settings.env
  source "$SETTINGS"
  for name in "${SETTING_NAMES[@]}"; do
    local saved=env_$name
    if [[ -n ${!saved+set} ]]; then printf -v "$name" '%s' "${!saved}"; fi
  done
}

# require NAME...: each setting must be set and not a YOUR_... placeholder.
require() {
  local name
  for name in "$@"; do
    [[ -n ${!name:-} ]] || die "setting $name is not set: edit $SETTINGS or export $name=..."
    [[ ${!name} != *YOUR_* ]] ||
      die "setting $name is still a placeholder (${!name}): edit $SETTINGS or export $name=..."
  done
}

# The common start of every script: `init "$@"` then `require` what it uses.
init() {
  parse_args "$@"
  load_settings
  require PROJECT ZONE TPU_NAME CAPACITY
  case $CAPACITY in
    on-demand | spot | preemptible | queued | queued-spot) ;;
    *) die "setting CAPACITY must be on-demand, spot, preemptible, queued or queued-spot, not '$CAPACITY'" ;;
  esac
  local name
  for name in REMOTE_DIR VENV_DIR LOG_DIR; do  # paths under the workers' home directory
    require "$name"
    [[ ${!name} =~ ^[A-Za-z0-9_][A-Za-z0-9_./-]*$ && ${!name} != *..* ]] ||
      die "setting $name must be a plain path relative to the home directory, not '${!name}'"
  done
}

no_args() {
  ((${#ARGS[@]} == 0)) || die "unexpected argument: ${ARGS[0]} (see --help)"
}

# quote WORD: WORD as a shell word, quoted only when it needs to be (--flag=VALUE: the value).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^(--[A-Za-z0-9._-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# run CMD ARG...: print the command (stdout under --dry-run, else stderr with "+ ") and run it
# unless this is a dry run.
run() {
  local line="" word
  for word in "$@"; do line+="${line:+ }$(quote "$word")"; done
  if [[ $DRY_RUN == 1 ]]; then
    echo "$line"
  else
    echo "+ $line" >&2
    "$@"
  fi
}

# remote_script STEP...: one line of shell for the workers, the steps joined by "; ".
remote_script() {
  local out="" step
  for step in "$@"; do out+="${out:+; }$step"; done
  printf '%s' "$out"
}

# tpu_vm SUBCOMMAND ARG...: gcloud compute tpus tpu-vm, in the settings' project and zone.
tpu_vm() {
  run gcloud compute tpus tpu-vm "$@" --project="$PROJECT" --zone="$ZONE"
}

# on_workers WORKER COMMAND: run a shell command over ssh on one worker, or on `all`.
on_workers() {
  tpu_vm ssh "$TPU_NAME" --worker="$1" --command="$2"
}
