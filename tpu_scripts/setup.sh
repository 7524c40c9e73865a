#!/usr/bin/env bash
# Install protlm-jax on every worker of a TPU VM / pod slice.
set -euo pipefail
# shellcheck source=tpu_scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

LIBTPU_FIND_LINKS=https://storage.googleapis.com/jax-releases/libtpu_releases.html

usage() {
  cat <<'EOF'
Usage: tpu_scripts/setup.sh --name NAME --zone ZONE --repo URL [options]

On every worker at once (`gcloud compute tpus tpu-vm ssh --worker=all`):
  1. install Python (python3.11 from the deadsnakes PPA when the image lacks
     it: the pins in constraints.txt need Python ≥ 3.11, Ubuntu 22.04 has 3.10);
  2. clone URL into DIR (or fetch, if already there) and check out REF;
  3. create DIR/.venv, `pip install -c constraints.txt -e .`, then
     `jax[tpu]` at the jax version pinned in constraints.txt
     (`grep '^jax==' constraints.txt`), with libtpu from
     https://storage.googleapis.com/jax-releases/libtpu_releases.html;
  4. print `jax.device_count()` (v3-8: 8; v3-1024: 1024 on every worker).
Running it again updates the checkout to REF and re-installs; it is safe to
repeat (e.g. after pushing a new gin file).

Options (environment variable in brackets; the flag wins):
  --name NAME       TPU VM name                                [PROTLM_TPU_NAME]  required
  --zone ZONE                                                  [PROTLM_ZONE]      required
  --project PROJECT                                            [PROTLM_PROJECT]
  --repo URL        git URL the workers can clone              [PROTLM_REPO]      required
                    (private repos: a deploy key or token on the workers)
  --ref REF         branch, tag or commit (default main)       [PROTLM_REF]
  --dir DIR         checkout on the workers, relative to the   [PROTLM_REMOTE_DIR]
                    remote home unless absolute (default protlm-jax)
  --python PY       interpreter for the venv (default python3.11)  [PROTLM_PYTHON]
  --internal-ip     ssh to the workers' internal IPs           [PROTLM_INTERNAL_IP=1]
  --dry-run         print the commands (`+ …`), run nothing    [PROTLM_DRY_RUN=1]
  -h, --help        this help

Before the first --worker=all call on a pod: `ssh-add ~/.ssh/google_compute_engine`.

Example:
  tpu_scripts/setup.sh --name protlm-smoke --zone europe-west4-a \
      --repo https://github.com/ORG/protlm-jax.git --ref main
EOF
}

REPO=${PROTLM_REPO:-}
REF=${PROTLM_REF:-main}
DIR=${PROTLM_REMOTE_DIR:-protlm-jax}
PY=${PROTLM_PYTHON:-python3.11}
INTERNAL_IP=${PROTLM_INTERNAL_IP:-0}

while (($#)); do
  case $1 in
    --repo | --repo=*) parse_opt "$@"; REPO=$OPTVAL; shift "$OPTSHIFT" ;;
    --ref | --ref=*) parse_opt "$@"; REF=$OPTVAL; shift "$OPTSHIFT" ;;
    --dir | --dir=*) parse_opt "$@"; DIR=$OPTVAL; shift "$OPTSHIFT" ;;
    --python | --python=*) parse_opt "$@"; PY=$OPTVAL; shift "$OPTSHIFT" ;;
    --internal-ip) INTERNAL_IP=1; shift ;;
    *) tpu_vm_opt "$@" || die "unknown argument '$1'; see --help"; shift "$OPTSHIFT" ;;
  esac
done

require "$NAME" --name PROTLM_TPU_NAME
require "$ZONE" --zone PROTLM_ZONE
require "$REPO" --repo PROTLM_REPO
require "$REF" --ref PROTLM_REF
require "$DIR" --dir PROTLM_REMOTE_DIR
require "$PY" --python PROTLM_PYTHON
[[ $REF != -* ]] || die "--ref must not start with '-': '$REF'"

RDIR=$(remote_path "$DIR")
QPY=$(q "$PY")
QREF=$(q "$REF")
# apt waits for the boot-time unattended-upgrades run instead of failing on its lock.
APT="sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q"
INSTALL_PYTHON=":"
if [[ $PY =~ ^python3\.[0-9]+$ ]]; then
  INSTALL_PYTHON="$APT update && $APT install -y software-properties-common && sudo add-apt-repository -y ppa:deadsnakes/ppa && $APT update && $APT install -y $PY $PY-venv"
fi

# One line of remote bash, run by every worker.
# shellcheck disable=SC2016
REMOTE="set -euo pipefail; \
if ! command -v $QPY >/dev/null; then $INSTALL_PYTHON; fi; \
if [ ! -d $RDIR/.git ]; then git clone -q $(q "$REPO") $RDIR; fi; \
cd $RDIR; \
git fetch -q --tags --force origin; \
git checkout -q --detach origin/$QREF 2>/dev/null || git checkout -q --detach $QREF; \
echo \"\$(hostname): protlm-jax at \$(git rev-parse --short HEAD)\"; \
[ -x .venv/bin/python ] || $QPY -m venv .venv; \
.venv/bin/pip install -q -U pip; \
.venv/bin/pip install -q -c constraints.txt -e .; \
JAX_VERSION=\$(grep '^jax==' constraints.txt | cut -d= -f3); \
[ -n \"\$JAX_VERSION\" ] || { echo 'no jax== pin in constraints.txt' >&2; exit 1; }; \
.venv/bin/pip install -q -c constraints.txt \"jax[tpu]==\$JAX_VERSION\" -f $LIBTPU_FIND_LINKS; \
.venv/bin/python -c \"import jax; print(jax.device_count())\""

gcloud_ssh_base "$NAME" all
run "${SSH[@]}" "--command=$REMOTE"
