#!/usr/bin/env bash
# Start `protlm train` on every worker of a TPU VM / pod slice, detached.
set -euo pipefail
# shellcheck source=tpu_scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/launch.sh --name NAME --zone ZONE --gin-file FILE [--gin-file FILE…]
                             --model-dir gs://… --data-dir gs://… [options] [-- TRAIN_ARGS…]

Runs, on all workers at once (`gcloud compute tpus tpu-vm ssh --worker=all`):

  cd DIR && PROTLM_DATA_DIR=gs://… nohup setsid .venv/bin/protlm train \
      --gin_file=FILE… --gin.MODEL_DIR="gs://…" TRAIN_ARGS… >> LOG 2>&1 &

detached (it outlives the ssh session), one log per worker:
~/protlm-logs/RUN/worker-N.log (N = the worker number; ~/protlm-logs/latest
points at the last RUN). Follow it with tpu_scripts/logs.sh.
No coordinator flags: on TPU VMs jax.distributed.initialize() finds the other
hosts by itself. Gin files are paths inside the workers' checkout (setup.sh);
TRAIN_ARGS after `--` reach `protlm train` unchanged, e.g.
  -- --gin.TRAIN_STEPS=1000 --gin.BATCH_SIZE=256
Launching again with the same MODEL_DIR resumes from its last checkpoint.

Options (environment variable in brackets; the flag wins):
  --name NAME          TPU VM name                            [PROTLM_TPU_NAME]   required
  --zone ZONE                                                 [PROTLM_ZONE]       required
  --project PROJECT                                           [PROTLM_PROJECT]
  --gin-file FILE      repeatable, in order                   [PROTLM_GIN_FILES, space-separated]  required
  --model-dir gs://…   checkpoints + summaries (--gin.MODEL_DIR)  [PROTLM_MODEL_DIR]  required
  --data-dir gs://…    prepared corpora, exported as PROTLM_DATA_DIR  [PROTLM_DATA_DIR]  required
  --env KEY=VALUE      more remote environment, repeatable    [PROTLM_LAUNCH_ENV, space-separated]
  --run-name RUN       log folder name (default: last part of MODEL_DIR)  [PROTLM_RUN_NAME]
  --dir DIR            checkout on the workers (default protlm-jax)  [PROTLM_REMOTE_DIR]
  --restart            stop a run still going on the workers first  [PROTLM_RESTART=1]
                       (otherwise launching over it is refused)
  --stop               only stop the run on every worker, start nothing
  --internal-ip        ssh to the workers' internal IPs       [PROTLM_INTERNAL_IP=1]
  --dry-run            print the command (`+ …`), run nothing  [PROTLM_DRY_RUN=1]
  -h, --help           this help

Example (v3-8 smoke run):
  tpu_scripts/launch.sh --name protlm-smoke --zone europe-west4-a \
      --gin-file gin/models/prot_t5_tiny.gin --gin-file gin/runs/pretrain.gin \
      --model-dir gs://BUCKET/runs/smoke --data-dir gs://BUCKET/protlm-data \
      -- --gin.MIXTURE_OR_TASK_NAME=\"uniprot_sample_prott5\" --gin.TRAIN_STEPS=200
EOF
}

MODEL_DIR=${PROTLM_MODEL_DIR:-}
DATA_DIR=${PROTLM_DATA_DIR:-}
RUN_NAME=${PROTLM_RUN_NAME:-}
DIR=${PROTLM_REMOTE_DIR:-protlm-jax}
RESTART=${PROTLM_RESTART:-0}
INTERNAL_IP=${PROTLM_INTERNAL_IP:-0}
STOP_ONLY=0
# Space-separated lists from the environment; flags replace them.
read -r -a GIN_FILES <<<"${PROTLM_GIN_FILES:-}"
read -r -a ENVS <<<"${PROTLM_LAUNCH_ENV:-}"
GIN_FROM_FLAGS=0
ENV_FROM_FLAGS=0
TRAIN_ARGS=()

while (($#)); do
  case $1 in
    --gin-file | --gin-file=* | --gin_file | --gin_file=*)
      parse_opt "$@"; shift "$OPTSHIFT"
      ((GIN_FROM_FLAGS)) || GIN_FILES=()
      GIN_FROM_FLAGS=1
      GIN_FILES+=("$OPTVAL") ;;
    --model-dir | --model-dir=*) parse_opt "$@"; MODEL_DIR=$OPTVAL; shift "$OPTSHIFT" ;;
    --data-dir | --data-dir=*) parse_opt "$@"; DATA_DIR=$OPTVAL; shift "$OPTSHIFT" ;;
    --env | --env=*)
      parse_opt "$@"; shift "$OPTSHIFT"
      ((ENV_FROM_FLAGS)) || ENVS=()
      ENV_FROM_FLAGS=1
      ENVS+=("$OPTVAL") ;;
    --run-name | --run-name=*) parse_opt "$@"; RUN_NAME=$OPTVAL; shift "$OPTSHIFT" ;;
    --dir | --dir=*) parse_opt "$@"; DIR=$OPTVAL; shift "$OPTSHIFT" ;;
    --restart) RESTART=1; shift ;;
    --stop) STOP_ONLY=1; shift ;;
    --internal-ip) INTERNAL_IP=1; shift ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) tpu_vm_opt "$@" || die "unknown argument '$1'; see --help (arguments for protlm train go after --)"; shift "$OPTSHIFT" ;;
  esac
done

require "$NAME" --name PROTLM_TPU_NAME
require "$ZONE" --zone PROTLM_ZONE
require "$DIR" --dir PROTLM_REMOTE_DIR

# shellcheck disable=SC2016  # $HOME is expanded on the remote host
LOG_ROOT='"$HOME"/protlm-logs'
PIDFILE="$LOG_ROOT/train.pid"
# Stop what the pid file names (its whole process group: setsid made it a
# group leader): TERM, up to 60 s to exit, then KILL.
# shellcheck disable=SC2016
STOP="if [ -s $PIDFILE ] && kill -0 \"\$(cat $PIDFILE)\" 2>/dev/null; then \
P=\$(cat $PIDFILE); echo \"worker \$W: stopping protlm train (pid \$P)\"; \
kill -TERM -- \"-\$P\" 2>/dev/null || kill -TERM \"\$P\"; \
for i in \$(seq 60); do kill -0 \"\$P\" 2>/dev/null || break; sleep 1; done; \
kill -KILL -- \"-\$P\" 2>/dev/null || true; rm -f $PIDFILE; fi"

gcloud_ssh_base "$NAME" all

if ((STOP_ONLY)); then
  run "${SSH[@]}" "--command=set -eu; $WORKER_ID_SNIPPET; $STOP"
  exit 0
fi

((${#GIN_FILES[@]})) || die "missing --gin-file (or set PROTLM_GIN_FILES); see --help"
require "$MODEL_DIR" --model-dir PROTLM_MODEL_DIR
require "$DATA_DIR" --data-dir PROTLM_DATA_DIR
# Worker disks go away with preemption and teardown; every host must see the
# same checkpoints and data.
[[ $MODEL_DIR == gs://?* ]] ||
  die "--model-dir must be a gs:// path (every worker writes there; VM disks vanish on preemption), got '$MODEL_DIR'"
[[ $DATA_DIR == gs://?* ]] ||
  die "--data-dir must be a gs:// path (every worker reads it), got '$DATA_DIR'"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
for f in "${GIN_FILES[@]}"; do
  [[ $f == /* || -e $REPO_ROOT/$f || -e $REPO_ROOT/gin/$f ]] ||
    note "warning: $f is not in this checkout; it has to be in the workers' checkout (setup.sh --ref)"
done
[[ -n $RUN_NAME ]] || RUN_NAME=$(basename "${MODEL_DIR%/}")
[[ $RUN_NAME =~ ^[A-Za-z0-9_.-]+$ && $RUN_NAME != . && $RUN_NAME != .. ]] ||
  die "--run-name: letters, digits, '_', '.', '-' only; got '$RUN_NAME'"

ARGS=(.venv/bin/protlm train)
for f in "${GIN_FILES[@]}"; do
  ARGS+=("--gin_file=$f")
done
# Quoted gin strings (protlm also takes them bare). DATA_DIR too: a gin file
# that sets it (as the pod experiments do) would win over PROTLM_DATA_DIR.
ARGS+=("--gin.MODEL_DIR=\"$MODEL_DIR\"" "--gin.DATA_DIR=\"$DATA_DIR\"")
ARGS+=(${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})

# PROTLM_DISTRIBUTED=1: the trainer calls jax.distributed.initialize(), which
# finds the other hosts of the slice from the TPU metadata (one host: just itself).
EXPORTS="export PROTLM_DATA_DIR=$(q "$DATA_DIR"); export PROTLM_DISTRIBUTED=1"
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env: expected KEY=VALUE, got '$kv'"
  EXPORTS+="; export ${kv%%=*}=$(q "${kv#*=}")"
done

if is_true "$RESTART"; then
  GUARD=$STOP
else
  GUARD="if [ -s $PIDFILE ] && kill -0 \"\$(cat $PIDFILE)\" 2>/dev/null; then \
echo \"worker \$W: protlm train is already running (pid \$(cat $PIDFILE)); launch.sh --restart stops it first\" >&2; exit 1; fi"
fi

RUN_DIR="$LOG_ROOT/$RUN_NAME"
LOG="$RUN_DIR/worker-\$W.log"
# One line of remote bash, run by every worker. The training process gets
# its own session (setsid) and no terminal, so it outlives the ssh session.
# shellcheck disable=SC2016
REMOTE="set -eu; $WORKER_ID_SNIPPET; $GUARD; \
cd $(remote_path "$DIR"); mkdir -p $RUN_DIR; ln -sfn $(q "$RUN_NAME") $LOG_ROOT/latest; \
$EXPORTS; \
echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) worker \$W: $(q "${ARGS[@]}" | sed 's/["\\$`]/\\&/g') ===\" >> $LOG; \
nohup setsid $(q "${ARGS[@]}") >> $LOG 2>&1 < /dev/null & \
echo \$! > $PIDFILE; echo \"worker \$W: protlm train started (pid \$!), log $LOG\""

run "${SSH[@]}" "--command=$REMOTE"
