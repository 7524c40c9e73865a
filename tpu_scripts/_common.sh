# Shared helpers for tpu_scripts/*.sh — sourced, never run.
#
# Conventions every script follows:
#   * an option is `--opt VALUE` or `--opt=VALUE`; each one also has an
#     environment variable (named in the script's --help); the flag wins;
#   * errors meant for the user are one line, `SCRIPT: error: reason`, exit 2;
#   * every command is shown as `+ cmd` (copy-pasteable bash); with --dry-run
#     (or PROTLM_DRY_RUN=1) the commands go to stdout and nothing runs.

# shellcheck shell=bash
# Variables set here (OPTSHIFT, NAME, WORKER_ID_SNIPPET, …) are read by the
# scripts that source this file.
# shellcheck disable=SC2034

PROG=$(basename "${BASH_SOURCE[1]:-$0}")
DRY_RUN=${PROTLM_DRY_RUN:-0}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

note() {
  printf '%s: %s\n' "$PROG" "$*" >&2
}

# is_true VALUE — 1/true/yes/on (any case) are true; empty, 0, false, no, off are false.
is_true() {
  case $1 in
    1 | [Tt][Rr][Uu][Ee] | [Yy][Ee][Ss] | [Oo][Nn]) return 0 ;;
    '' | 0 | [Ff][Aa][Ll][Ss][Ee] | [Nn][Oo] | [Oo][Ff][Ff]) return 1 ;;
    *) die "expected a boolean (1/0, true/false, yes/no), got '$1'" ;;
  esac
}

# q ARG… — the arguments quoted for bash, space-separated: plain words stay
# bare, anything else is single-quoted.
q() {
  local a sep='' sq="'" rep="'\\''" plain='^[A-Za-z0-9_@%+=:,./-]+$'
  for a in "$@"; do
    if [[ -n $a && $a =~ $plain ]]; then
      printf '%s%s' "$sep" "$a"
    else
      printf "%s'%s'" "$sep" "${a//$sq/$rep}"
    fi
    sep=' '
  done
}

# run CMD ARG… — show `+ CMD ARG…`; run it unless this is a dry run.
run() {
  if is_true "$DRY_RUN"; then
    printf '+ %s\n' "$(q "$@")"
  else
    printf '+ %s\n' "$(q "$@")" >&2
    "$@"
  fi
}

# parse_opt "$@" — the value of the option in $1 (`--opt=VALUE` or `--opt VALUE`)
# into OPTVAL, and into OPTSHIFT how many words it used.
parse_opt() {
  if [[ $1 == *=* ]]; then
    OPTVAL=${1#*=}
    OPTSHIFT=1
  elif (($# >= 2)); then
    OPTVAL=$2
    OPTSHIFT=2
  else
    die "$1 needs a value"
  fi
}

# The options every TPU VM script shares, with their environment defaults.
NAME=${PROTLM_TPU_NAME:-}
ZONE=${PROTLM_ZONE:-}
PROJECT=${PROTLM_PROJECT:-}

# tpu_vm_opt "$@" — parse one shared option (--help, --dry-run, --name,
# --zone, --project); sets OPTSHIFT, or returns 1 when $1 is not one of them.
# The calling script must define usage().
tpu_vm_opt() {
  OPTSHIFT=1
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --name | --name=*) parse_opt "$@"; NAME=$OPTVAL ;;
    --zone | --zone=*) parse_opt "$@"; ZONE=$OPTVAL ;;
    --project | --project=*) parse_opt "$@"; PROJECT=$OPTVAL ;;
    *) return 1 ;;
  esac
}

# require VALUE FLAG ENVVAR — die with one line when VALUE is empty.
require() {
  [[ -n $1 ]] || die "missing $2 (or set $3); see --help"
}

# remote_path PATH — PATH for a remote shell: relative paths are taken from the
# remote home (quoted, with "$HOME" left for the remote shell to expand).
remote_path() {
  if [[ $1 == /* ]]; then
    q "$1"
  else
    # shellcheck disable=SC2016  # $HOME is expanded on the remote host
    printf '"$HOME"/%s' "$(q "$1")"
  fi
}

# Shell snippet that sets W to this TPU VM worker's number (as JAX reads it
# from the metadata server), falling back to the host name.
# shellcheck disable=SC2016
WORKER_ID_SNIPPET='W=$(curl -sf -m 10 -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname -s)'

# gcloud_ssh_base NAME WORKER — the start of a `gcloud … tpu-vm ssh` command
# (into the array SSH), using ZONE, PROJECT and INTERNAL_IP from the caller.
gcloud_ssh_base() {
  SSH=(gcloud compute tpus tpu-vm ssh "$1" "--zone=$ZONE" "--worker=$2")
  [[ -z ${PROJECT:-} ]] || SSH+=("--project=$PROJECT")
  ! is_true "${INTERNAL_IP:-0}" || SSH+=(--internal-ip)
}
