#!/usr/bin/env bash
# Install everything (see setup.sh), then run the main job on the bundled digits dataset:
# write it as .beton files and read it back through the training data pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
OUT=${OUT:-data/digits}
if [ ! -f "$OUT/train.beton" ] || [ ! -f "$OUT/val.beton" ]; then
    "$VENV/bin/python" data_prep/write_ffcv.py --dataset digits --out-dir "$OUT" --overwrite
fi
"$VENV/bin/python" -m fastibd.inspect_data "$OUT/train.beton" --batch-size 128
