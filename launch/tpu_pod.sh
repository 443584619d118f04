#!/usr/bin/env bash
# Train on a multi-host Cloud TPU pod slice (v4-32, v5p-64, v6e-32, ...), from a workstation
# with gcloud:
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE CONFIG[:preset] WORKDIR [--config.key=value ...]
#
# It packs this checkout (the files git tracks plus untracked ones it does not ignore, so local
# changes go too), copies it to every worker with `gcloud compute tpus tpu-vm scp`, then on all
# workers at once installs "jax[tpu]==0.10.2" and requirements.txt and runs
#   python3 -m fqgan_jax.main --distributed --config=CONFIG --workdir=WORKDIR ...
# `--distributed` calls jax.distributed.initialize(), which finds the slice's hosts from the TPU
# metadata.
#
# WORKDIR must be one place every host can write, normally gs://bucket/run: all hosts write
# each checkpoint together. A local path gives every host its own directory. The data must be
# reachable from every host too, e.g. --config.data.tfds_data_dir=gs://bucket/tensorflow_datasets.
#
# Environment (all optional):
#   GCP_PROJECT  the TPU's project (default: gcloud's configured project)
#   REPO_URL     `git clone` this on every worker instead of copying the local checkout
#   REPO_REF     branch or tag to clone from REPO_URL (default: its default branch)
#   REMOTE_DIR   where the code goes on the workers, relative to the home dir (default: fqgan_jax)
#   VENV         virtualenv on the workers to activate first (absolute, or relative to home)
#   PYTHON       Python 3.11+ on the workers (default: python3)
#   DRY_RUN=1    print the gcloud commands instead of running them
set -euo pipefail

jax_pin="jax[tpu]==0.10.2"

usage() {
  cat >&2 <<EOF
usage: $0 TPU_NAME ZONE CONFIG[:preset] WORKDIR [--config.key=value ...]

Runs python3 -m fqgan_jax.main --distributed on every worker of a TPU pod slice.
  CONFIG   path inside the repository, e.g. configs/dual.py or configs/dual.py:ds8
  WORKDIR  must be writable by every host, e.g. gs://bucket/run (a local path gives
           each host its own directory)
Environment: GCP_PROJECT, REPO_URL, REPO_REF, REMOTE_DIR, VENV, PYTHON, DRY_RUN=1
(see the top of this script).
EOF
  exit 2
}

if [[ $# -lt 4 ]]; then
  usage
fi
tpu_name=$1
zone=$2
config=$3
workdir=$4
shift 4

remote_dir=${REMOTE_DIR:-fqgan_jax}
if [[ ! $remote_dir =~ ^[A-Za-z0-9_][A-Za-z0-9._/-]*$ || $remote_dir == *..* ]]; then
  echo "error: REMOTE_DIR must be a plain path relative to the workers' home, got '$remote_dir'" >&2
  exit 2
fi
python=${PYTHON:-python3}
dry_run=false
if [[ -n ${DRY_RUN:-} && ${DRY_RUN} != 0 ]]; then
  dry_run=true
fi

if [[ $workdir != gs://* ]]; then
  echo "warning: WORKDIR '$workdir' is not a gs:// path. Every host of the pod writes" \
    "checkpoints there, so it must be a filesystem all workers share; a local path gives" \
    "each host its own directory." >&2
fi
if ! $dry_run && ! command -v gcloud >/dev/null 2>&1; then
  echo "error: gcloud not found (https://cloud.google.com/sdk/docs/install)" >&2
  exit 1
fi

gcloud_flags=(--zone="$zone")
if [[ -n ${GCP_PROJECT:-} ]]; then
  gcloud_flags+=(--project="$GCP_PROJECT")
fi

# Prints a command as one line of shell words, quoted with printf %q.
words() {
  local line
  line=$(printf '%q ' "$@")
  printf '%s' "${line% }"
}

run() {
  if $dry_run; then
    words "$@"
    echo
  else
    "$@"
  fi
}

# Packs the checkout into $1: git's tracked and untracked-but-not-ignored files, or, outside
# git, everything but .git and build leftovers.
pack() {
  local root
  root=$(cd "$(dirname "$0")/.." && pwd)
  if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$root" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' file; do
        # Deleted but still tracked files are listed too; skip them.
        if [[ -e $root/$file ]]; then
          printf '%s\0' "$file"
        fi
      done |
      COPYFILE_DISABLE=1 tar -C "$root" --null -T - -czf "$1"
  else
    COPYFILE_DISABLE=1 tar -C "$root" --exclude=.git --exclude=__pycache__ \
      --exclude='*.egg-info' -czf "$1" .
  fi
}

# The command every worker runs (in its home dir), as words joined by &&.
steps=()
if [[ -n ${VENV:-} ]]; then
  steps+=("$(words . "$VENV/bin/activate")")
fi
check_python='import sys; assert sys.version_info >= (3, 11), '
check_python+='"fqgan_jax needs Python 3.11+: set PYTHON or VENV"'
steps+=("$(words "$python" -c "$check_python")")
steps+=("$(words rm -rf -- "$remote_dir")")
if [[ -n ${REPO_URL:-} ]]; then
  clone=(git clone -q --depth=1)
  if [[ -n ${REPO_REF:-} ]]; then
    clone+=(--branch="$REPO_REF")
  fi
  steps+=("$(words "${clone[@]}" -- "$REPO_URL" "$remote_dir")")
else
  remote_tarball=fqgan_jax_src.tar.gz
  if $dry_run; then
    tarball=/tmp/fqgan_jax_src.tar.gz
    echo "# pack $(cd "$(dirname "$0")/.." && pwd) into $tarball"
  else
    tmp=$(mktemp -d)
    trap 'rm -rf -- "$tmp"' EXIT
    tarball=$tmp/fqgan_jax_src.tar.gz
    pack "$tarball"
  fi
  run gcloud compute tpus tpu-vm scp "$tarball" "$tpu_name:$remote_tarball" \
    --worker=all "${gcloud_flags[@]}"
  steps+=("$(words mkdir -p -- "$remote_dir")")
  steps+=("$(words tar -xzf "$remote_tarball" -C "$remote_dir")")
  steps+=("$(words rm -f -- "$remote_tarball")")
fi
steps+=("$(words cd -- "$remote_dir")")
steps+=("$(words "$python" -m pip install -q "$jax_pin" -r requirements.txt)")
steps+=("$(words "$python" -m pip install -q --no-deps -e .)")
steps+=("$(words exec "$python" -m fqgan_jax.main --distributed --config="$config" \
  --workdir="$workdir" "$@")")

remote=${steps[0]}
for step in "${steps[@]:1}"; do
  remote+=" && $step"
done
if $dry_run; then
  echo "# on every worker: $remote"
fi

run gcloud compute tpus tpu-vm ssh "$tpu_name" --worker=all "${gcloud_flags[@]}" \
  --command="$remote"
