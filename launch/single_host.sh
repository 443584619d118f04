#!/usr/bin/env bash
# Train on one machine (CPU, one or more GPUs, or a single TPU VM).
#
#   bash launch/single_host.sh configs/dual.py /path/to/workdir [--config.key=value ...]
#
# GPU hosts first install the CUDA plugin that matches the pinned jax:
#   pip install "jax[cuda12]==0.10.2"
# TPU VMs:
#   pip install "jax[tpu]==0.10.2"
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG[:preset] WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
cd "$(dirname "$0")/.."
pip install -q -r requirements.txt
pip install -q --no-deps -e .
exec python -m fqgan_jax.main --config="$config" --workdir="$workdir" "$@"
