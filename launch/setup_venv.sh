#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs wamjax with the given extras (comma-separated: test,tpu), pinned in
# pyproject.toml.
# torch is installed first, alone, at the exact pinned version, so nothing pulls a different build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-export}"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=".venv/.installed-${extras}-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet "torch==2.13.0"
  .venv/bin/pip install --quiet -e ".[${extras}]"
  touch "$stamp"
fi
