#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice for protlm-jax.
set -euo pipefail
# shellcheck source=tpu_scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/create.sh --name NAME --zone ZONE [options] [-- GCLOUD_FLAGS…]

Create a TPU VM (one host, e.g. v3-8) or a pod slice (many hosts, e.g. v3-1024)
with `gcloud compute tpus tpu-vm create`. Flags after `--` go to gcloud as they
are (e.g. -- --network=my-net --reserved --labels=team=protein).

Options (environment variable in brackets; the flag wins):
  --name NAME              TPU VM name                          [PROTLM_TPU_NAME]  required
  --zone ZONE              e.g. europe-west4-a, us-central2-b   [PROTLM_ZONE]      required
  --project PROJECT        default: gcloud's core/project       [PROTLM_PROJECT]
  --accelerator-type TYPE  v3-8, v3-1024, v4-8, v4-256, …       [PROTLM_ACCELERATOR_TYPE]
                           (default v3-8)
  --runtime VERSION        TPU software version (alias --version)  [PROTLM_RUNTIME]
                           default: tpu-ubuntu2204-base for v2/v3/v4,
                           v2-alpha-tpuv5-lite for v5litepod-*, v2-alpha-tpuv5 for
                           v5p-*, v2-alpha-tpuv6e for v6e-*
  --preemptible            preemptible TPU (cheaper; can be taken away;  [PROTLM_PREEMPTIBLE=1]
                           at most 24 h)
  --spot                   Spot TPU (cheaper; can be taken away)   [PROTLM_SPOT=1]
  --dry-run                print the command (`+ …`), run nothing  [PROTLM_DRY_RUN=1]
  -h, --help               this help

A preempted or Spot TPU cannot be restarted: delete it (teardown.sh), create
it again, run setup.sh and the same launch.sh command — training resumes from
the last checkpoint in MODEL_DIR.

Example:
  tpu_scripts/create.sh --name protlm-smoke --zone europe-west4-a \
      --accelerator-type v3-8 --preemptible
EOF
}

ACCELERATOR_TYPE=${PROTLM_ACCELERATOR_TYPE:-v3-8}
RUNTIME=${PROTLM_RUNTIME:-}
PREEMPTIBLE=${PROTLM_PREEMPTIBLE:-0}
SPOT=${PROTLM_SPOT:-0}
EXTRA=()

while (($#)); do
  case $1 in
    --accelerator-type | --accelerator-type=*)
      parse_opt "$@"; ACCELERATOR_TYPE=$OPTVAL; shift "$OPTSHIFT" ;;
    --runtime | --runtime=* | --version | --version=*)
      parse_opt "$@"; RUNTIME=$OPTVAL; shift "$OPTSHIFT" ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --spot) SPOT=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) tpu_vm_opt "$@" || die "unknown argument '$1'; see --help"; shift "$OPTSHIFT" ;;
  esac
done

require "$NAME" --name PROTLM_TPU_NAME
require "$ZONE" --zone PROTLM_ZONE
require "$ACCELERATOR_TYPE" --accelerator-type PROTLM_ACCELERATOR_TYPE
[[ $ACCELERATOR_TYPE =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
  die "--accelerator-type: expected e.g. v3-8, v3-1024, v4-32, v5litepod-16; got '$ACCELERATOR_TYPE'"
if is_true "$PREEMPTIBLE" && is_true "$SPOT"; then
  die "--preemptible and --spot exclude each other; pick one"
fi

if [[ -z $RUNTIME ]]; then
  case $ACCELERATOR_TYPE in
    v5litepod-* | v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) RUNTIME=tpu-ubuntu2204-base ;;
  esac
fi

CMD=(gcloud compute tpus tpu-vm create "$NAME" "--zone=$ZONE"
  "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME")
[[ -z $PROJECT ]] || CMD+=("--project=$PROJECT")
! is_true "$PREEMPTIBLE" || CMD+=(--preemptible)
! is_true "$SPOT" || CMD+=(--spot)
CMD+=(${EXTRA[@]+"${EXTRA[@]}"})

run "${CMD[@]}"
