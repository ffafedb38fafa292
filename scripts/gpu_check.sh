#!/usr/bin/env bash
# Everything only a GPU can show, in one command (meant to finish inside 9 minutes on one
# H100):
#
#   bash scripts/gpu_check.sh [RESULTS_DIR]
#
# Parts, in order (GPU_CHECK_PARTS=kernels,bench,step,train,ddp picks some):
#   kernels  the kernel tests on CUDA: compiled Triton kernels vs float64 references
#   bench    python -m kernels.bench: the feature loss, eager vs torch.compile vs fused
#            (configs: GPU_CHECK_BENCH_CONFIGS); on CUDA also --tiles (part "tiles"): the
#            pool kernels alone with each tile variant, to pick the small maps' tile
#            (configs: GPU_CHECK_TILES_CONFIGS, the ImageNet ones: their 7x7 / 5x5 taps)
#   step     python -m fastibd.bench_step --data device: the whole training step
#            (workloads: GPU_CHECK_STEP_WORKLOADS)
#   train    compiled smoke runs on CUDA, on the bundled digits written as .npz (no FFCV
#            needed): a PGD-AT teacher (part "teacher"), then an IBD student ("student")
#   ddp      the IBD student again under `torchrun --nproc_per_node=1`: DDP over NCCL
# Each part has its own time limit (GPU_CHECK_TIMEOUT_<PART>=seconds overrides it), 575 s in
# all; one that fails or runs out of time is reported, and the others still run. The exit
# status is 0 only when every part passed.
#
# Results go to RESULTS_DIR (default docs/benchmarks/gpu-check-<card>-<date>): summary.md
# (environment, every part's status and time, the tables) and each part's full log and files.
#
# It runs on a bare, offline GPU machine whose Python differs from ours (e.g. Python 3.12,
# torch 2.11, triton 3.6, numpy, torchvision; no ffcv): nothing is installed into that
# Python. The package is used from this checkout (PYTHONPATH), and the pure-Python
# dependencies it lacks are installed with --no-deps into a private folder from wheels in
# GPU_CHECK_WHEELS (default .whl/ at the repository root), prepared on a networked machine:
#   bash scripts/gpu_wheels.sh          # -> .whl/ (fastargs, terminaltables)
#
# GPU_CHECK_DEVICE=cpu rehearses every part on a CPU with tiny settings: no GPU number comes
# out of it, but every command, import and file path is exercised. PYTHON picks the
# interpreter (default python3).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PARTS=${GPU_CHECK_PARTS:-kernels,bench,step,train,ddp}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}
STEP_WORKLOADS=${GPU_CHECK_STEP_WORKLOADS:-cifar,imagenet160,imagenet224}
BENCH_CONFIGS=${GPU_CHECK_BENCH_CONFIGS:-cifar-b128,imagenet160-b256,imagenet224-b256}
TILES_CONFIGS=${GPU_CHECK_TILES_CONFIGS:-imagenet160-b256,imagenet224-b256}

fail() { echo "gpu_check: $*" >&2; exit 2; }

case "$DEVICE" in cuda | cpu) ;; *) fail "GPU_CHECK_DEVICE must be cuda or cpu, not $DEVICE" ;; esac
for part in ${PARTS//,/ }; do
    case "$part" in kernels | bench | step | train | ddp) ;;
        *) fail "unknown part '$part' in GPU_CHECK_PARTS (kernels, bench, step, train, ddp)" ;;
    esac
done
command -v "$PYTHON" >/dev/null || fail "no $PYTHON on PATH (set PYTHON)"

# ------------------------------------------------------------------ dependencies
SITE=$(mktemp -d "${TMPDIR:-/tmp}/fastibd-gpu-check-site.XXXXXX")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastibd-gpu-check.XXXXXX")
trap 'rm -rf "$SITE" "$WORK"' EXIT
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
        --target "$SITE" "$WHEELS"/*.whl || fail "could not install the wheels in $WHEELS"
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
missing=$("$PYTHON" - <<'EOF'
import importlib.util
need = ["torch", "numpy", "yaml", "tqdm", "PIL", "sklearn", "fastargs", "terminaltables",
        "pytest"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
) || fail "$PYTHON does not run"
[ -z "$missing" ] || fail "missing Python packages: $missing (pure-Python ones travel as \
wheels: bash scripts/gpu_wheels.sh on a networked machine, then copy .whl/ here)"
if [ "$DEVICE" = cuda ]; then
    "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" ||
        fail "torch sees no CUDA device (GPU_CHECK_DEVICE=cpu rehearses the script on a CPU)"
fi

# ------------------------------------------------------------------ results folder
CARD=$("$PYTHON" -c "
import torch
name = torch.cuda.get_device_name() if '$DEVICE' == 'cuda' else 'cpu'
print(''.join(c if c.isalnum() else '-' for c in name.lower()).strip('-'))")
RESULTS=${1:-docs/benchmarks/gpu-check-$CARD-$(date -u +%Y-%m-%d)}
mkdir -p "$RESULTS" || fail "cannot create $RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
SUMMARY=$RESULTS/summary.md
{
    echo "# scripts/gpu_check.sh on $CARD"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- command: \`GPU_CHECK_DEVICE=$DEVICE GPU_CHECK_PARTS=$PARTS bash scripts/gpu_check.sh\`"
    echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    "$PYTHON" - <<'EOF'
import platform
import numpy, torch
print(f"- python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}",
      end="")
try:
    import triton
    print(f", triton {triton.__version__}")
except ImportError:
    print(", no triton")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"- device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"CUDA {torch.version.cuda}")
EOF
    if [ "$DEVICE" = cuda ] && command -v nvidia-smi >/dev/null; then  # read-only query
        echo "- nvidia-smi: $(nvidia-smi --query-gpu=driver_version,clocks.max.sm,power.limit \
            --format=csv,noheader 2>/dev/null | head -1) (driver, max SM clock, power limit)"
    fi
    echo
    echo "| part | status | seconds | limit |"
    echo "|---|---|---:|---:|"
} >"$SUMMARY"
TABLES=$WORK/tables.md
: >"$TABLES"

# ------------------------------------------------------------------ parts
FAILED=0

# run_part NAME DEFAULT_LIMIT COMMAND...: run under a time limit, log to RESULTS/NAME.log
run_part() {
    local name=$1 limit=$2
    shift 2
    local var="GPU_CHECK_TIMEOUT_${name^^}"
    limit=${!var:-$limit}
    local log=$RESULTS/$name.log start=$SECONDS rc status
    echo "== $name (limit ${limit}s): $*" | tee "$log"
    timeout --signal=TERM --kill-after=20 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    case $rc in
        0) status=passed ;;
        124 | 137) status="timed out"; FAILED=1 ;;
        *) status="failed (exit $rc)"; FAILED=1 ;;
    esac
    echo "| $name | $status | $((SECONDS - start)) | $limit |" >>"$SUMMARY"
    echo "   $status in $((SECONDS - start)) s; log: $log"
    [ $rc = 0 ] || tail -n 15 "$log" | sed 's/^/   | /'
    return 0
}

wants() { [[ ",$PARTS," == *",$1,"* ]]; }

if [ "$DEVICE" = cuda ]; then
    TRAIN=(--training.device=cuda --training.compile=true)
    TEACHER_EPOCHS=(--training.epochs=8)
    STUDENT_EPOCHS=(--training.epochs=8)
    DDP_EPOCHS=(--training.epochs=2)
    STEP=(--device cuda --workloads "$STEP_WORKLOADS" --warmup 3 --steps 10)
    BENCH=(--device cuda --configs "$BENCH_CONFIGS")
else  # rehearsal: tiny and eager
    TRAIN=(--training.device=cpu --training.compile=false --attack.steps=2 --attack.eval_steps=2)
    TEACHER_EPOCHS=(--training.epochs=3)
    STUDENT_EPOCHS=(--training.epochs=1 --training.max_steps=3)
    DDP_EPOCHS=(--training.epochs=1 --training.max_steps=2)
    STEP=(--device cpu --workloads cifar-tiny --warmup 1 --steps 1)
    BENCH=(--device cpu --cpu-reps 1)
fi
DATA=(--data.train_path="$WORK/digits/train.npz" --data.val_path="$WORK/digits/val.npz"
      --logging.progress=false)

if wants kernels; then
    # On a CPU the CUDA tests are collected and skipped: their imports still have to work.
    run_part kernels 80 "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py \
        -k cuda
fi
if wants bench; then
    run_part bench 100 "$PYTHON" -m kernels.bench "${BENCH[@]}" --out "$RESULTS/kernels_bench"
    { echo; echo "## kernels.bench"; echo; echo '```';
      sed -n '/^ *config /,$p' "$RESULTS/bench.log"; echo '```'; } >>"$TABLES"
    if [ "$DEVICE" = cuda ]; then  # times Triton kernels: nothing to rehearse on a CPU
        # 8 kernel specializations the bench part has not compiled (Triton caches the rest)
        run_part tiles 45 "$PYTHON" -m kernels.bench --tiles --configs "$TILES_CONFIGS"
        { echo; echo "## kernels.bench --tiles"; echo; echo '```';
          sed -n '/^pool kernels alone/,$p' "$RESULTS/tiles.log"; echo '```'; } >>"$TABLES"
    fi
fi
if wants step; then
    run_part step 120 "$PYTHON" -m fastibd.bench_step --data device "${STEP[@]}" \
        --no-progress --json "$RESULTS/bench_step.json"
    { echo; echo "## fastibd.bench_step"; echo; echo '```';
      sed -n '/^workload/,$p' "$RESULTS/step.log"; echo '```'; } >>"$TABLES"
fi
if wants train || wants ddp; then
    "$PYTHON" data_prep/write_ffcv.py --dataset digits --format npz \
        --out-dir "$WORK/digits" >"$RESULTS/data.log" 2>&1 ||
        { echo "| data | failed: see data.log |  |  |" >>"$SUMMARY"; FAILED=1; }
    TEACHER_RUN=("$PYTHON" -m fastibd.train --cfg smoke_teacher "${DATA[@]}" "${TRAIN[@]}"
                 "${TEACHER_EPOCHS[@]}" --training.out_dir="$WORK/teacher")
    if wants train; then
        run_part teacher 60 "${TEACHER_RUN[@]}"
        run_part student 90 "$PYTHON" -m fastibd.train --cfg smoke "${DATA[@]}" "${TRAIN[@]}" \
            "${STUDENT_EPOCHS[@]}" --teacher.path="$WORK/teacher/best.pt" \
            --training.out_dir="$WORK/student"
        { echo; echo "## training (smoke configs on digits .npz)"; echo; echo '```';
          grep -hE "^(epoch|final)" "$RESULTS/teacher.log" "$RESULTS/student.log"; echo '```'; } \
            >>"$TABLES"
    fi
    if wants ddp; then
        [ -f "$WORK/teacher/best.pt" ] || run_part teacher 60 "${TEACHER_RUN[@]}"
        run_part ddp 80 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 \
            -m fastibd.train --cfg smoke "${DATA[@]}" "${TRAIN[@]}" "${DDP_EPOCHS[@]}" \
            --teacher.path="$WORK/teacher/best.pt" --training.out_dir="$WORK/ddp"
        backend=$([ "$DEVICE" = cuda ] && echo nccl || echo gloo)
        if ! grep -q "^distributed: 1 process, backend $backend" "$RESULTS/ddp.log"; then
            echo "| ddp | did not run DDP over $backend (see ddp.log) |  |  |" >>"$SUMMARY"
            FAILED=1
        fi
        { echo; echo "## DDP, one process (torchrun --nproc_per_node=1)"; echo; echo '```';
          grep -E "^(distributed|epoch|final)" "$RESULTS/ddp.log"; echo '```'; } >>"$TABLES"
    fi
fi

cat "$TABLES" >>"$SUMMARY"
echo
cat "$SUMMARY"
echo
echo "results: $RESULTS"
exit $FAILED
