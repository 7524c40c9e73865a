#!/usr/bin/env bash
# Delete a TPU VM / pod slice.
set -euo pipefail
# shellcheck source=tpu_scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/teardown.sh --name NAME --zone ZONE [--yes] [options]

Deletes the TPU VM with `gcloud compute tpus tpu-vm delete`, after asking
(answer y) unless --yes. Billing stops only when it is gone. What lives on the
worker disks goes with it — the checkout, the venv and the worker logs
(save them first with logs.sh --all --no-follow); checkpoints and summaries in
gs://MODEL_DIR stay.

Options (environment variable in brackets; the flag wins):
  --name NAME       TPU VM name                               [PROTLM_TPU_NAME]  required
  --zone ZONE                                                 [PROTLM_ZONE]      required
  --project PROJECT                                           [PROTLM_PROJECT]
  --yes             do not ask                                [PROTLM_YES=1]
  --async           return before the deletion has finished   [PROTLM_ASYNC=1]
  --dry-run         print the command (`+ …`), run nothing    [PROTLM_DRY_RUN=1]
  -h, --help        this help
EOF
}

YES=${PROTLM_YES:-0}
ASYNC=${PROTLM_ASYNC:-0}

while (($#)); do
  case $1 in
    -y | --yes) YES=1; shift ;;
    --async) ASYNC=1; shift ;;
    *) tpu_vm_opt "$@" || die "unknown argument '$1'; see --help"; shift "$OPTSHIFT" ;;
  esac
done

require "$NAME" --name PROTLM_TPU_NAME
require "$ZONE" --zone PROTLM_ZONE

# gcloud's own prompt is skipped (--quiet): the question is asked here, once.
CMD=(gcloud compute tpus tpu-vm delete "$NAME" "--zone=$ZONE" --quiet)
[[ -z $PROJECT ]] || CMD+=("--project=$PROJECT")
! is_true "$ASYNC" || CMD+=(--async)

if ! is_true "$DRY_RUN" && ! is_true "$YES"; then
  where="zone $ZONE${PROJECT:+, project $PROJECT}"
  printf 'Delete TPU VM %s (%s)? Its disks go with it. [y/N] ' "$NAME" "$where" >&2
  answer=''
  read -r answer || true
  case $answer in
    [Yy] | [Yy][Ee][Ss]) ;;
    *) printf '%s: not deleted\n' "$PROG" >&2; exit 1 ;;
  esac
fi

run "${CMD[@]}"
