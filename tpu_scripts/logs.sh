#!/usr/bin/env bash
# Follow the training log of a TPU VM worker (or of all of them).
set -euo pipefail
# shellcheck source=tpu_scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/logs.sh --name NAME --zone ZONE [--worker N | --all] [options]

Follows (tail -F) ~/protlm-logs/RUN/worker-N.log, written by launch.sh, on
worker N (default 0, the one that logs the metrics). With --all every worker
streams its own log, each line prefixed with `[N]` (a pod slice opens one ssh
connection per worker: v3-1024 has 128). Ctrl-C stops following; the training
goes on.

Options (environment variable in brackets; the flag wins):
  --name NAME       TPU VM name                               [PROTLM_TPU_NAME]  required
  --zone ZONE                                                 [PROTLM_ZONE]      required
  --project PROJECT                                           [PROTLM_PROJECT]
  --worker N        worker number (default 0)                 [PROTLM_WORKER]
  --all             every worker                              [PROTLM_ALL_WORKERS=1]
  --run-name RUN    which run (default latest: the last launch)  [PROTLM_RUN_NAME]
  --lines N         lines of history first (default 100)      [PROTLM_LOG_LINES]
  --no-follow       print the last lines and exit             [PROTLM_NO_FOLLOW=1]
  --internal-ip     ssh to the workers' internal IPs          [PROTLM_INTERNAL_IP=1]
  --dry-run         print the command (`+ …`), run nothing    [PROTLM_DRY_RUN=1]
  -h, --help        this help

Worker logs live on the VM disks and disappear with the VM: save them first,
e.g. `tpu_scripts/logs.sh … --all --no-follow --lines 100000 > run.log`.
EOF
}

WORKER=${PROTLM_WORKER:-0}
ALL=${PROTLM_ALL_WORKERS:-0}
RUN_NAME=${PROTLM_RUN_NAME:-latest}
LINES=${PROTLM_LOG_LINES:-100}
NO_FOLLOW=${PROTLM_NO_FOLLOW:-0}
INTERNAL_IP=${PROTLM_INTERNAL_IP:-0}

while (($#)); do
  case $1 in
    --worker | --worker=*) parse_opt "$@"; WORKER=$OPTVAL; shift "$OPTSHIFT" ;;
    --all) ALL=1; shift ;;
    --run-name | --run-name=*) parse_opt "$@"; RUN_NAME=$OPTVAL; shift "$OPTSHIFT" ;;
    --lines | --lines=*) parse_opt "$@"; LINES=$OPTVAL; shift "$OPTSHIFT" ;;
    --no-follow) NO_FOLLOW=1; shift ;;
    --internal-ip) INTERNAL_IP=1; shift ;;
    *) tpu_vm_opt "$@" || die "unknown argument '$1'; see --help"; shift "$OPTSHIFT" ;;
  esac
done

require "$NAME" --name PROTLM_TPU_NAME
require "$ZONE" --zone PROTLM_ZONE
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker: expected a worker number (0, 1, …), got '$WORKER'"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines: expected a number, got '$LINES'"
[[ $RUN_NAME =~ ^[A-Za-z0-9_.-]+$ && $RUN_NAME != . && $RUN_NAME != .. ]] ||
  die "--run-name: letters, digits, '_', '.', '-' only; got '$RUN_NAME'"

if is_true "$NO_FOLLOW"; then TAIL="tail -n $LINES"; else TAIL="tail -n $LINES -F"; fi
LOG_DIR="\"\$HOME\"/protlm-logs/$RUN_NAME"

if is_true "$ALL"; then
  gcloud_ssh_base "$NAME" all
  # shellcheck disable=SC2016
  REMOTE="$WORKER_ID_SNIPPET; $TAIL $LOG_DIR/worker-\$W.log | sed -u \"s/^/[\$W] /\""
else
  gcloud_ssh_base "$NAME" "$WORKER"
  # shellcheck disable=SC2016
  REMOTE="$WORKER_ID_SNIPPET; $TAIL $LOG_DIR/worker-\$W.log"
fi

run "${SSH[@]}" "--command=$REMOTE"
