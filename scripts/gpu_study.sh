#!/usr/bin/env bash
# The main arms of docs/results.md on one GPU, at the paper's network and geometry, in one resumable call:
# scratch, the pre-trained arm and Mean Teacher on the pre-trained weights at 1 labeled scan, 3 seeds, each arm's lr
# chosen on the mean validation Dice over the seeds from {1e-3, 3e-3}. It is the study command with the `gpu` budget
# (pre-training 20 x 200 iterations with configs/gpu.json, about 5 min on one H200; fine-tunes of 20 x 50
# iterations) and --jobs: under the mean rule every fine-tune of an arm is independent of the others, so scratch's
# run beside the pre-training and the pre-trained arms' side by side after it, all on the one GPU.
# Usage (repository root; the bundle's requirements installed):
#   DATA=<ACDC training folder> OUT=<results folder> bash scripts/gpu_study.sh
# Settings (environment): STUDY (the study folder, default runs/study/acdc_gpu), METHODS, LABELED, SEEDS, LRS, JOBS
# (steps at once, default 6), BUDGET (default gpu), LIMIT (seconds the study may run; 0, the default, for no limit).
# A study stopped by LIMIT resumes where it stopped when the script is called again with the same STUDY, so a
# machine lent for a few minutes at a time can run it in several calls; each call reports what has finished.
# What it leaves in $OUT: the GPU's name, the study's output, its report (results.md, runs.csv, pretraining.png), its
# log, and runs.tar.gz with every run's log.txt, done.json and cluster_health.jsonl (no weights, no images).
# The exit status is the study's (124 when LIMIT stopped it).
set -uo pipefail
DATA=${DATA:?set DATA to the ACDC training folder (patientNNN/ sub-folders)}
OUT=${OUT:-runs/gpu_study}
STUDY=${STUDY:-runs/study/acdc_gpu}
METHODS=${METHODS:-[scratch,ours,mt_ours]}
LABELED=${LABELED:-[1]}
SEEDS=${SEEDS:-[0,1,2]}
LRS=${LRS:-[1e-3,3e-3]}
JOBS=${JOBS:-6}
BUDGET=${BUDGET:-gpu}
LIMIT=${LIMIT:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}"

if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
else
    echo "no nvidia-smi: no GPU" >"$OUT/gpu.txt"
fi
cat "$OUT/gpu.txt"

args=(--dataset_dir "$DATA" --out_dir "$STUDY" --budget "$BUDGET" --methods "$METHODS" --labeled "$LABELED"
    --seeds "$SEEDS" --lrs "$LRS" --lr_choice mean)
start=$SECONDS
if [ "$LIMIT" -gt 0 ]; then
    timeout --signal=TERM --kill-after=60 "$LIMIT" "$PY" -m scripts.study "${args[@]}" --jobs "$JOBS" 2>&1 |
        tee "$OUT/study_output.txt"
else
    "$PY" -m scripts.study "${args[@]}" --jobs "$JOBS" 2>&1 | tee "$OUT/study_output.txt"
fi
rc=${PIPESTATUS[0]}
echo "study: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/study_output.txt"

# a study stopped by LIMIT (or a failed step) draws no report itself: the report of whatever has finished
if [ "$rc" -ne 0 ]; then
    "$PY" -m scripts.study "${args[@]}" --report_only True >>"$OUT/study_output.txt" 2>&1
fi
for f in results.md runs.csv pretraining.png study.log; do
    [ -f "$STUDY/$f" ] && cp "$STUDY/$f" "$OUT/"
done
(cd "$STUDY" && find . \( -name done.json -o -name log.txt -o -name cluster_health.jsonl \) -print0 |
    tar czf - --null -T -) >"$OUT/runs.tar.gz"
exit "$rc"
