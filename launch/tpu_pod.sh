#!/usr/bin/env bash
# Runs `python -m wamjax.main` on every worker of a Cloud TPU VM pod slice, and reruns the same command when
# the run was preempted (exit code 75: it saved a checkpoint on SIGTERM; rerunning resumes from it).
#
#   launch/tpu_pod.sh --config=configs/wam.py:size=wan1.3b,stage=video_pretrain --workdir=gs://BUCKET/runs/wan13b
#
# Set PROJECT, ZONE and TPU_NAME below (or in the environment). The repository is expected at REMOTE_DIR
# (relative to the home directory) on every worker with its .venv; SYNC=1 copies this checkout there first
# and runs launch/setup_venv.sh on every worker.
# jax.distributed.initialize() finds the pod's workers from the TPU VM metadata (distributed.initialize=true).
set -euo pipefail

PROJECT=${PROJECT:-my-gcp-project}
ZONE=${ZONE:-us-central2-b}
TPU_NAME=${TPU_NAME:-my-tpu-v4-64}
REMOTE_DIR=${REMOTE_DIR:-wamjax}
MAX_RESTARTS=${MAX_RESTARTS:-20}
WAIT_READY_MINUTES=${WAIT_READY_MINUTES:-60}
PREEMPTED_EXIT_CODE=75

if [ $# -eq 0 ]; then
  echo "usage: $0 --config=configs/wam.py:size=...,stage=... --workdir=gs://... [--config.x=y ...]" >&2
  exit 2
fi

tpu_ssh() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --worker=all --command="$1"
}

if [ "${SYNC:-0}" = "1" ]; then
  repo="$(cd "$(dirname "$0")/.." && pwd)"
  gcloud compute tpus tpu-vm scp --recurse "$repo" "$TPU_NAME:$REMOTE_DIR" --project="$PROJECT" --zone="$ZONE" \
    --worker=all
  tpu_ssh "cd $REMOTE_DIR && bash launch/setup_venv.sh export,tpu"   # tpu: libtpu, the TPU runtime
fi

# Flags are quoted for the remote shell, so values with spaces or commas survive the ssh hop. Each worker
# prints its exit status: gcloud reports only that some worker failed, not with which code.
remote_flags=$(printf ' %q' "$@")
command="cd $REMOTE_DIR && .venv/bin/python -m wamjax.main$remote_flags --config.distributed.initialize=true; rc=\$?; echo \"[wamjax-exit] \$rc\"; exit \$rc"
log=$(mktemp)
trap 'rm -f "$log"' EXIT

for ((attempt = 0; attempt <= MAX_RESTARTS; attempt++)); do
  echo "[tpu_pod] attempt $attempt on $TPU_NAME ($ZONE): $command" >&2
  rc=0
  tpu_ssh "$command" 2>&1 | tee "$log" || rc=$?
  if [ "$rc" -eq 0 ]; then
    exit 0
  fi
  if ! grep -q "\[wamjax-exit\] $PREEMPTED_EXIT_CODE" "$log"; then
    echo "[tpu_pod] failed (exit $rc) without a preemption; not resubmitting" >&2
    exit "$rc"
  fi
  echo "[tpu_pod] preempted (exit $PREEMPTED_EXIT_CODE); waiting for the TPU to be READY, then resuming" >&2
  # A maintenance event brings the same TPU back; a reclaimed spot TPU stays PREEMPTED and must be recreated.
  for ((minute = 0; ; minute++)); do
    state=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
              --format='value(state)')
    [ "$state" = "READY" ] && break
    if [ "$minute" -ge "$WAIT_READY_MINUTES" ]; then
      echo "[tpu_pod] $TPU_NAME is $state after $WAIT_READY_MINUTES min; recreate it and rerun this command" >&2
      exit "$PREEMPTED_EXIT_CODE"
    fi
    sleep 60
  done
done
echo "[tpu_pod] gave up after $MAX_RESTARTS restarts" >&2
exit "$PREEMPTED_EXIT_CODE"
