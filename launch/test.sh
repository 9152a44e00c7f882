#!/usr/bin/env bash
# Runs the test suite (and ruff) on CPU with 8 simulated devices, installing what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_venv.sh test,tpu,sim   # tpu: libtpu for the compile-for-TPU tests; sim: Meta-World
.venv/bin/ruff check .
export XLA_FLAGS="--xla_force_host_platform_device_count=8" JAX_PLATFORMS=cpu
# Two workers, whole files each (module fixtures are built once): most tests are single-threaded XLA compiles.
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --durations=15 "$@" tests
