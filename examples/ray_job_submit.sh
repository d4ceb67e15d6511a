#!/usr/bin/env bash
# Submit a weightcast load as a Ray job; the repository root is the job's working directory.
#
#   RAY_ADDRESS=http://HEAD:8265 examples/ray_job_submit.sh CHECKPOINT [launch.ray_job options]
#   e.g. RAY_ADDRESS=http://127.0.0.1:8265 examples/ray_job_submit.sh demo_checkpoint --ranks-per-node 2 --verify
#
# The head must run from the environment that has weightcast's dependencies: `ray job` starts the
# entry point with the `python` on the PATH of `ray start`. On the head node, for example:
#   .venv/bin/ray start --head --dashboard-host 127.0.0.1 --disable-usage-stats
# (and `.venv/bin/ray start --address HEAD:6379` on the other nodes). CHECKPOINT must be readable
# at the same absolute path on every node (or contain {node} for per-node copies). Exits 0 only
# when the job SUCCEEDED.
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the job API of the head, e.g. http://127.0.0.1:8265}"
[[ $# -ge 1 ]] || { echo "usage: $0 CHECKPOINT [launch.ray_job options]" >&2; exit 2; }
case "$1" in /*) ckpt=$1 ;; *) ckpt="$PWD/$1" ;; esac  # the job runs elsewhere: an absolute path
shift
cd "$(dirname "$0")/.."
if [[ -x .venv/bin/ray ]]; then RAY=${RAY:-.venv/bin/ray}; else RAY=${RAY:-ray}; fi
id="weightcast-$(date +%Y%m%d-%H%M%S)-$$"
"$RAY" job submit --address="$RAY_ADDRESS" --submission-id "$id" --working-dir . -- \
    python -m weightcast.launch.ray_job "$ckpt" "$@"
status=$("$RAY" job status --address="$RAY_ADDRESS" "$id" 2>&1 || true)
if [[ "$status" == *"Job '$id' succeeded"* ]]; then
    echo "job $id: SUCCEEDED"
else
    echo "job $id: not succeeded (see: $RAY job logs --address=$RAY_ADDRESS $id)" >&2
    exit 1
fi
