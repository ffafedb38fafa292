#!/usr/bin/env bash
# Install everything (see setup.sh), then run the main job on the bundled digits dataset,
# on the CPU: write it as .beton files, adversarially train a tiny robust teacher (PGD-AT),
# distil it into an IBD student, and print the student's clean and PGD accuracy.
# Rerunning resumes (finished runs only print their results again).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
if [ ! -f data/digits/train.beton ] || [ ! -f data/digits/val.beton ]; then
    "$VENV/bin/python" data_prep/write_ffcv.py --dataset digits --out-dir data/digits --overwrite
fi
"$VENV/bin/python" -m fastibd.train --cfg smoke_teacher
"$VENV/bin/python" -m fastibd.train --cfg smoke
"$VENV/bin/python" -m fastibd.evaluate --ckpt runs/smoke/best.pt --data data/digits/val.beton \
    --attacks clean,fgsm,pgd20,cw20 --eps 8/255 --out runs/smoke/report.json
