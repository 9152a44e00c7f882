#!/usr/bin/env bash
# Runs the test suite (and ruff) on CPU with 8 simulated devices, installing what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_venv.sh test,tpu,sim   # tpu: libtpu for the compile-for-TPU tests; sim: Meta-World
.venv/bin/ruff check .
export XLA_FLAGS="--xla_force_host_platform_device_count=8" JAX_PLATFORMS=cpu
# Two workers, whole files each (module fixtures are built once): most tests are single-threaded XLA compiles.
# The real multi-process jobs run afterwards on their own, so no other test slows one of their processes past
# gloo's rendezvous timeout.
# pytest's exit 5 (nothing selected, e.g. when "$@" names one file) is not a failure of either half.
run() { .venv/bin/python -m pytest -q "$@" || { rc=$?; [ "$rc" -eq 5 ] || exit "$rc"; }; }
run -n "${PYTEST_WORKERS:-2}" --dist loadfile --durations=15 -m "not multiprocess" "$@" tests
run --durations=5 -m multiprocess "$@" tests
