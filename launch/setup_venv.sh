#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs wamjax with the given extras (comma-separated), pinned in
# pyproject.toml. torch is installed first, alone, at the exact pinned version, so nothing pulls a different
# build. With the `sim` extra it also installs the Debian libraries MuJoCo renders with on a CPU (EGL on
# Mesa's software rasterizer) when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-export}"
python=${PYTHON:-python3}
if [[ ",${extras}," == *",sim,"* ]]; then
  missing=()
  for package in libegl1 libgl1-mesa-dri; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    if ! command -v apt-get >/dev/null; then
      echo "MuJoCo's CPU rendering needs ${missing[*]} (or their equivalents); install them and rerun" >&2
      exit 1
    fi
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "Installing ${missing[*]} (MuJoCo's CPU rendering)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=".venv/.installed-${extras//,/-}-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet "torch==2.13.0"
  .venv/bin/pip install --quiet -e ".[${extras}]"
  touch "$stamp"
fi
