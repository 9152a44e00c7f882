#!/usr/bin/env bash
# Creates ./.venv-lerobot (if missing or stale): the LeRobot library in a venv of its own, used only to write
# LeRobot datasets the reader is tested against (tests/fixtures/lerobot). Its torch and torchvision pins stay out
# of the project's venv. lerobot 0.4.4 (the last release for Python 3.11) asks for torch<2.11; it is installed
# without its dependency pins, beside the torch/torchvision pair these machines have, with what its dataset
# writer imports.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=${LEROBOT_VENV:-.venv-lerobot}
stamp="$venv/.installed-lerobot-0.4.4-torch-2.14.1"
if [ ! -f "$stamp" ]; then
  "$python" -m venv --clear "$venv"
  "$venv/bin/pip" install --quiet "torch==2.14.1" "torchvision==0.29.1"
  "$venv/bin/pip" install --quiet --no-deps "lerobot==0.4.4" "accelerate==1.16.0"
  "$venv/bin/pip" install --quiet "datasets==4.8.5" "huggingface-hub==0.35.3" "av==15.1.0" "jsonlines==4.0.0" \
    "packaging==25.0" "pandas==3.1.1" "draccus==0.10.0" "einops==0.8.2" "deepdiff==8.6.2" "termcolor==3.3.0" \
    "imageio[ffmpeg]==2.38.2" "imageio-ffmpeg==0.8.1" "gymnasium==1.4.0" "psutil==7.2.2" "safetensors==0.8.0" \
    "pyyaml==6.0.4" "rerun-sdk==0.26.2"
  "$venv/bin/python" -c "from lerobot.datasets.lerobot_dataset import LeRobotDataset, CODEBASE_VERSION; \
assert CODEBASE_VERSION == 'v3.0', CODEBASE_VERSION"
  touch "$stamp"
fi
