#!/usr/bin/env bash
# Submit tpu_scripts/slurm_gpu.sbatch: protlm train on N GPU nodes.
set -euo pipefail
# shellcheck source=tpu_scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

usage() {
  cat <<'EOF'
Usage: tpu_scripts/slurm_submit.sh --gin-file FILE [--gin-file FILE…] --model-dir DIR
                                   --data-dir DIR [options] [-- TRAIN_ARGS…]

Submits tpu_scripts/slurm_gpu.sbatch with `sbatch`: NODES nodes, one task per
node, each task using all GPUS_PER_NODE GPUs of its node, all started by one
`srun` and joined by jax.distributed.initialize(). TRAIN_ARGS after `--` reach
`protlm train` unchanged. Resubmitting with the same MODEL_DIR resumes from its
last checkpoint (and the job asks to be requeued if preempted).

Options (environment variable in brackets; the flag wins):
  --gin-file FILE     repeatable, relative to the repo dir  [PROTLM_GIN_FILES, space-separated]  required
  --model-dir DIR     checkpoints (--gin.MODEL_DIR): shared filesystem or gs://  [PROTLM_MODEL_DIR]  required
  --data-dir DIR      prepared corpora (PROTLM_DATA_DIR)    [PROTLM_DATA_DIR]  required
  --nodes N           default 1                             [PROTLM_NODES]
  --gpus-per-node G   default 8                             [PROTLM_GPUS_PER_NODE]
  --cpus-per-task C   CPUs per node-task (data pipeline)    [PROTLM_CPUS_PER_TASK]
  --partition P                                             [PROTLM_PARTITION]
  --account A                                               [PROTLM_ACCOUNT]
  --time T            e.g. 2-00:00:00                       [PROTLM_TIME]
  --job-name NAME     default protlm-train                  [PROTLM_JOB_NAME]
  --repo-dir DIR      checkout with .venv on the shared filesystem (default:
                      this checkout)                        [PROTLM_REPO_DIR]
  --log-dir DIR       job + per-task logs (default REPO_DIR/logs/slurm)  [PROTLM_LOG_DIR]
  --dist auto|explicit  how processes find each other (see slurm_gpu.sbatch
                      --help; default auto)                 [PROTLM_JAX_DIST]
  --sbatch-arg ARG    one more sbatch flag, repeatable, e.g. --sbatch-arg=--qos=high
                                                            [PROTLM_SBATCH_ARGS, space-separated]
  --dry-run           print the commands (`+ …`), run nothing  [PROTLM_DRY_RUN=1]
  -h, --help          this help

Example:
  tpu_scripts/slurm_submit.sh --nodes 4 --gpus-per-node 8 --partition gpu \
      --gin-file gin/experiments/prot_t5_xl_uniref50.gin \
      --model-dir /shared/runs/prot_t5_xl_u50 --data-dir /shared/protlm-data \
      -- --gin.BATCH_SIZE=512
EOF
}

NODES=${PROTLM_NODES:-1}
GPUS=${PROTLM_GPUS_PER_NODE:-8}
CPUS=${PROTLM_CPUS_PER_TASK:-}
PARTITION=${PROTLM_PARTITION:-}
ACCOUNT=${PROTLM_ACCOUNT:-}
TIME=${PROTLM_TIME:-}
JOB_NAME=${PROTLM_JOB_NAME:-protlm-train}
REPO_DIR=${PROTLM_REPO_DIR:-$REPO_ROOT}
LOG_DIR=${PROTLM_LOG_DIR:-}
DIST=${PROTLM_JAX_DIST:-auto}
MODEL_DIR=${PROTLM_MODEL_DIR:-}
DATA_DIR=${PROTLM_DATA_DIR:-}
read -r -a GIN_FILES <<<"${PROTLM_GIN_FILES:-}"
read -r -a SBATCH_ARGS <<<"${PROTLM_SBATCH_ARGS:-}"
GIN_FROM_FLAGS=0
SB_FROM_FLAGS=0
TRAIN_ARGS=()

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --gin-file | --gin-file=* | --gin_file | --gin_file=*)
      parse_opt "$@"; shift "$OPTSHIFT"
      ((GIN_FROM_FLAGS)) || GIN_FILES=()
      GIN_FROM_FLAGS=1
      GIN_FILES+=("$OPTVAL") ;;
    --model-dir | --model-dir=*) parse_opt "$@"; MODEL_DIR=$OPTVAL; shift "$OPTSHIFT" ;;
    --data-dir | --data-dir=*) parse_opt "$@"; DATA_DIR=$OPTVAL; shift "$OPTSHIFT" ;;
    --nodes | --nodes=*) parse_opt "$@"; NODES=$OPTVAL; shift "$OPTSHIFT" ;;
    --gpus-per-node | --gpus-per-node=*) parse_opt "$@"; GPUS=$OPTVAL; shift "$OPTSHIFT" ;;
    --cpus-per-task | --cpus-per-task=*) parse_opt "$@"; CPUS=$OPTVAL; shift "$OPTSHIFT" ;;
    --partition | --partition=*) parse_opt "$@"; PARTITION=$OPTVAL; shift "$OPTSHIFT" ;;
    --account | --account=*) parse_opt "$@"; ACCOUNT=$OPTVAL; shift "$OPTSHIFT" ;;
    --time | --time=*) parse_opt "$@"; TIME=$OPTVAL; shift "$OPTSHIFT" ;;
    --job-name | --job-name=*) parse_opt "$@"; JOB_NAME=$OPTVAL; shift "$OPTSHIFT" ;;
    --repo-dir | --repo-dir=*) parse_opt "$@"; REPO_DIR=$OPTVAL; shift "$OPTSHIFT" ;;
    --log-dir | --log-dir=*) parse_opt "$@"; LOG_DIR=$OPTVAL; shift "$OPTSHIFT" ;;
    --dist | --dist=*) parse_opt "$@"; DIST=$OPTVAL; shift "$OPTSHIFT" ;;
    --sbatch-arg | --sbatch-arg=*)
      parse_opt "$@"; shift "$OPTSHIFT"
      ((SB_FROM_FLAGS)) || SBATCH_ARGS=()
      SB_FROM_FLAGS=1
      SBATCH_ARGS+=("$OPTVAL") ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown argument '$1'; see --help (arguments for protlm train go after --)" ;;
  esac
done

((${#GIN_FILES[@]})) || die "missing --gin-file (or set PROTLM_GIN_FILES); see --help"
require "$MODEL_DIR" --model-dir PROTLM_MODEL_DIR
require "$DATA_DIR" --data-dir PROTLM_DATA_DIR
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes: expected a positive number, got '$NODES'"
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node: expected a positive number, got '$GPUS'"
[[ -z $CPUS || $CPUS =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-task: expected a positive number, got '$CPUS'"
case $DIST in auto | explicit) ;; *) die "--dist: expected auto or explicit, got '$DIST'" ;; esac
[[ $REPO_DIR == /* ]] || REPO_DIR=$PWD/$REPO_DIR
[[ -n $LOG_DIR ]] || LOG_DIR=$REPO_DIR/logs/slurm
[[ $LOG_DIR == /* ]] || LOG_DIR=$PWD/$LOG_DIR
for v in "$DATA_DIR" "$REPO_DIR" "$LOG_DIR"; do
  # sbatch --export separates variables with commas.
  [[ $v != *,* ]] || die "paths passed through sbatch --export cannot contain ',': '$v'"
done

CMD=(sbatch "--job-name=$JOB_NAME" "--nodes=$NODES" --ntasks-per-node=1
  "--gpus-per-node=$GPUS" "--chdir=$REPO_DIR" "--output=$LOG_DIR/%x-%j.out")
[[ -z $CPUS ]] || CMD+=("--cpus-per-task=$CPUS")
[[ -z $PARTITION ]] || CMD+=("--partition=$PARTITION")
[[ -z $ACCOUNT ]] || CMD+=("--account=$ACCOUNT")
[[ -z $TIME ]] || CMD+=("--time=$TIME")
CMD+=("--export=ALL,PROTLM_DATA_DIR=$DATA_DIR,PROTLM_REPO_DIR=$REPO_DIR,PROTLM_LOG_DIR=$LOG_DIR,PROTLM_JAX_DIST=$DIST,PROTLM_GPUS_PER_NODE=$GPUS")
CMD+=(${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"})
CMD+=("$SCRIPT_DIR/slurm_gpu.sbatch")
for f in "${GIN_FILES[@]}"; do
  CMD+=("--gin_file=$f")
done
CMD+=("--gin.MODEL_DIR=\"$MODEL_DIR\"" "--gin.DATA_DIR=\"$DATA_DIR\"")
CMD+=(${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})

run mkdir -p "$LOG_DIR"
run "${CMD[@]}"
