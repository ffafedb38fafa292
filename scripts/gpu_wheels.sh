#!/usr/bin/env bash
# Prepare the wheels scripts/gpu_check.sh installs on an offline GPU machine: the pure-Python
# dependencies a stock PyTorch image lacks, built here (with network) into .whl/:
#   bash scripts/gpu_wheels.sh [DIR]
# fastargs (config) and terminaltables (which fastargs imports without declaring it). Add
# pyautoattack==0.2.0 by hand for `fastibd.evaluate --attacks aa` there (42 MB: it
# ships a checkpoint). Copy DIR next to the checkout on the GPU machine, or point
# GPU_CHECK_WHEELS at it.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip wheel -q --no-deps -w "$DIR" fastargs==1.2.0 terminaltables==3.1.10
ls -l "$DIR"
