#!/usr/bin/env bash
# Step-1 epoch time of FT, MiB, PLOP, MiB+EWF, PLOP+EWF, DFT* and MiCro side by side on synthetic
# Vaihingen 3-1s, from the step-0 models of benchmarks/synthetic_methods.sh (run it first with the same OUT;
# FT's step 0 for every method but DFT*, which needs its own). The methods run interleaved, ROUNDS times,
# EPOCHS epochs each; the figure is the median epoch time over all rounds and epochs, relative to FT's.
#   OUT=bench_out benchmarks/baselines_step1_time.sh
# Environment: PYTHON, OUT (default bench_out), ROUNDS (2), EPOCHS (2), METHODS.
source "$(dirname "$0")/_env.sh"
OUT=${OUT:-bench_out}
ROUNDS=${ROUNDS:-2}
EPOCHS=${EPOCHS:-2}
METHODS=${METHODS:-"FT MiB PLOP MiB+EWF PLOP+EWF DFTstar MiCro"}
ckpt="$OUT/checkpoints/step"
for round in $(seq 1 "$ROUNDS"); do
    for method in $METHODS; do
        step0="$ckpt/3-1s-vaihingen_FT_0.pth"
        [ "$method" = DFTstar ] && step0="$ckpt/3-1s-vaihingen_DFTstar_0.pth"
        dir="$OUT/time/round$round"
        mkdir -p "$dir"
        echo "== round $round $method"
        "$PY" run.py --data_root "$OUT/data" --dataset vaihingen --task 3-1s --step 1 --method "$method" \
            --step_ckpt "$step0" --backbone resnet18 --no_pretrained --crop_size 128 --batch_size 8 \
            --num_workers 1 --val_interval 1000 --random_seed 42 --epochs "$EPOCHS" --lr 0.01 --sample_num 0 \
            --checkpoint_dir "$dir/checkpoints" --logdir "$dir/logs" --results_dir "$dir/results" \
            > "$dir.$method.out" 2>&1 || { tail -5 "$dir.$method.out"; exit 1; }
    done
done
"$PY" - "$OUT" $METHODS <<'PY'
import statistics
import sys
from pathlib import Path

from benchmarks.epoch_times import epoch_seconds

out, methods = Path(sys.argv[1]), sys.argv[2:]
times = {m: [t for log in sorted((out / "time").glob(f"round*/logs/3-1s-vaihingen/{m}/step1/log.txt"))
             for t in epoch_seconds(log)] for m in methods}
ft = statistics.median(times["FT"])
print("| method | step-1 epoch s (median) | / FT | epochs timed |")
print("|---|---|---|---|")
for m in methods:
    med = statistics.median(times[m])
    print(f"| {m} | {med:.1f} | {med / ft:.2f} | {len(times[m])} |")
PY
