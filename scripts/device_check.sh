#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md ("On a GPU"), in one run of about 6 minutes on one H200:
#   1. the objective on CUDA equals the CPU one (fp32, and fp16 probabilities under autocast);
#   2. the paper-scale step benchmark with AMP (U-Net vs T + heads + losses), eager and under torch.compile (the U-Net's
#      feature pass, the heads and the objective, each compiled on its own; T's alignment eager);
#   3. the pre-training loader's throughput on 100 generated patients (2 and 8 workers);
#   4. the bundle's pre-training at paper scale (configs/pretrain.json as shipped: widths 32..512, 2 x 18 slices of
#      224^2, K = 40, 3 heads, AMP) for 3 epochs x 100 iterations, with the GPU memory sampled by nvidia-smi;
#   5. a short fine-tune from those weights with one labeled scan (configs/train.json at paper scale, 4 epochs x 100
#      iterations, lr 1e-3) and the evaluation of the test split (configs/evaluate.json).
# Every step runs even when an earlier one failed; the exit status counts the failures.
# Usage (repository root; needs monai, nibabel, pytorch-ignite and fire importable):
#   OUT=<results folder> bash scripts/device_check.sh
# STEPS="data pretrain finetune evaluate" runs only those steps; with TAR=<file> the results folder is packed into
# that file after every step (what survives a time limit).
set -uo pipefail
OUT=${OUT:-runs/device_check}
ROOT=${ROOT:-runs/device_check_bundle}
DATA=${DATA:-data/synthetic_acdc}
PY=${PYTHON:-python3}
# config files (a CPU dry run of this script's plumbing can point them at the quick overlays)
PRETRAIN_CONFIG=${PRETRAIN_CONFIG:-configs/pretrain.json}
TRAIN_CONFIG=${TRAIN_CONFIG:-configs/train.json}
EVALUATE_CONFIG=${EVALUATE_CONFIG:-"['configs/train.json','configs/evaluate.json']"}
mkdir -p "$OUT" "$ROOT"
export PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}"
STEPS=${STEPS:-losses step_benchmark step_benchmark_compiled data loader_2_workers loader_8_workers pretrain finetune evaluate}
failures=0
step() {  # step NAME LOGFILE COMMAND...: run, keep the whole output in $OUT/LOGFILE, time it
    local name=$1 logfile=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $(date +%T) $name: $*"
    local start=$SECONDS
    "$@" >"$OUT/$logfile" 2>&1
    local rc=$?
    tail -n 6 "$OUT/$logfile"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    echo "$name $rc $((SECONDS - start))" >>"$OUT/steps.txt"
    [ $rc -eq 0 ] || failures=$((failures + 1))
    if [ -n "${TAR:-}" ]; then tar czf "$TAR" -C "$(dirname "$OUT")" "$(basename "$OUT")"; fi
}
bundle() {  # bundle RUN_ID CONFIG_FILE OVERRIDES...
    local run_id=$1 config=$2
    shift 2
    $PY -m monai.bundle run "$run_id" --config_file "$config" --meta_file configs/metadata.json \
        --logging_file configs/logging.conf --bundle_root "$ROOT" --dataset_dir "$DATA" \
        --datalist "$ROOT/datalist.json" "$@"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
$PY -c "import torch, monai; print('torch', torch.__version__, '| monai', monai.__version__, '|', torch.cuda.get_device_name())" \
    >>"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

step losses losses_cuda.txt $PY -m scripts.device_check losses
step step_benchmark step.txt $PY -m scripts.benchmark step --device cuda --repeats 10 --warmup 3 --json_out "$OUT/step.json"
step step_benchmark_compiled step_compiled.txt $PY -m scripts.benchmark step --device cuda --compile true --repeats 10 \
    --warmup 3 --json_out "$OUT/step_compiled.json"
step data data.txt $PY -m scripts.make_synthetic_data --output "$DATA" --num_patients 100 --num_workers 8
step loader_2_workers loader2.txt $PY -m scripts.benchmark loader --data "$DATA" --num_workers 2 --num_batches 100
step loader_8_workers loader8.txt $PY -m scripts.benchmark loader --data "$DATA" --num_workers 8 --num_batches 100

nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$OUT/pretrain_gpu_mem_mib.txt" 2>/dev/null &
smi=$!
step pretrain pretrain.log bundle training "$PRETRAIN_CONFIG" --show_progress False --epochs 3 --iterations 100 --warmup_epochs 1 \
    --num_workers 8 --resume False --log_interval 50 --image_interval 100
kill $smi 2>/dev/null
echo "peak GPU memory during pre-training (nvidia-smi, MiB): $(sort -n "$OUT/pretrain_gpu_mem_mib.txt" | tail -n 1)"

finetune=(--epochs 4 --iterations 100 --warmup_epochs 1 --lr 0.001 --num_labeled 1 --num_workers 8
    --pretrained_required True)
step finetune finetune.log bundle training "$TRAIN_CONFIG" "${finetune[@]}"
step evaluate evaluate.log bundle evaluating "$EVALUATE_CONFIG" "${finetune[@]}"
cp "$ROOT/runs/evaluate/metrics_summary.json" "$OUT/" 2>/dev/null
if [ -n "${TAR:-}" ]; then tar czf "$TAR" -C "$(dirname "$OUT")" "$(basename "$OUT")"; fi
cat "$OUT/steps.txt"
echo "failures: $failures"
exit "$failures"
