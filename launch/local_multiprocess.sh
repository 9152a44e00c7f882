#!/usr/bin/env bash
# A real multi-host run on one machine: N CPU processes on localhost (gloo collectives), each running
# `python -m wamjax.main` with the given flags and DEVICES_PER_PROCESS simulated devices (default 4).
#
#   launch/local_multiprocess.sh 2 --config=configs/wam.py:size=tiny,stage=video_pretrain --workdir=/tmp/run
#
# Every process's output is prefixed with [pI]. Exits with the first failing process's status (after
# stopping the others), 75 when they were preempted (each saves the agreed step first, so the others are left
# to finish), or 0 when all succeed. Relative paths in the flags resolve from the caller's cwd.
set -euo pipefail

if [ $# -lt 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES [wamjax.main flags...]  (got ${1:-nothing} for NUM_PROCESSES)" >&2
  exit 2
fi
num_processes=$1
shift
repo="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
devices=${DEVICES_PER_PROCESS:-4}
port=${COORDINATOR_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

# Each process gets its own simulated device count; any count inherited from the caller is dropped.
xla_flags="$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"
export XLA_FLAGS="$xla_flags --xla_force_host_platform_device_count=$devices"
export JAX_PLATFORMS=cpu
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

pids=()
stop_all() {
  local signal=$1 pid
  for pid in "${pids[@]}"; do
    kill "-$signal" "$pid" 2>/dev/null || true
  done
}
trap 'stop_all TERM; exit 143' INT TERM

for ((i = 0; i < num_processes; i++)); do
  # The caller's flags come first: --config must precede the --config.* overrides.
  "$PYTHON" -m wamjax.main "$@" \
    --config.distributed.initialize=true \
    --config.distributed.coordinator_address="127.0.0.1:$port" \
    --config.distributed.num_processes="$num_processes" \
    --config.distributed.process_id="$i" \
    > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done
echo "started $num_processes processes (pids ${pids[*]}) x $devices CPU devices, coordinator 127.0.0.1:$port" >&2

# Poll rather than `wait -n`: a peer that dies leaves the others blocked in collectives, so they are stopped.
remaining=$num_processes
status=0
failed_at=-1
declare -A done_pids=()
while [ "$remaining" -gt 0 ]; do
  if [ "$failed_at" -ge 0 ] && [ $((SECONDS - failed_at)) -ge 20 ]; then
    stop_all KILL  # still running 20 s after SIGTERM
    failed_at=-1
  fi
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    if [ -n "${done_pids[$pid]:-}" ] || kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    done_pids[$pid]=1
    remaining=$((remaining - 1))
    if [ "$rc" -eq 75 ] && [ "$status" -eq 0 ]; then
      status=75  # preempted after the agreed save: the others save the same step and exit 75 too
    elif [ "$rc" -ne 0 ] && [ "$rc" -ne 75 ] && { [ "$status" -eq 0 ] || [ "$status" -eq 75 ]; }; then
      status=$rc
      echo "process $i (pid $pid) exited with status $rc; stopping the others" >&2
      stop_all TERM
      failed_at=$SECONDS
    fi
  done
  sleep 0.5
done
wait 2>/dev/null || true  # the output prefixers
exit "$status"
