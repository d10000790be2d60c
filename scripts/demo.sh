#!/usr/bin/env bash
# The demo: synthetic Vaihingen -> processing -> task 3-1s, step 0 (clutter, impervious surfaces, building,
# low vegetation) then step 1 (tree) with FT, MiB and MiCro on a
# small ResNet-18 on the CPU -> the old/new/all table, a bar figure and a picture of the predictions.
# About 5 minutes on 2 free cores. Everything goes to demo_out/ (delete it to start over).
#
# What it shows, at the last step: FT learns the new class and forgets the old ones; MiB and MiCro keep
# the old classes and learn the new one. (Task 4-1's new class, car, is about 1 % of the synthetic pixels
# and is learned by no method in this budget: the demo shows 3-1s, whose new class covers about 22 %.)
# Environment: PYTHON, OUT, TASK, LAST_STEP, EPOCHS0, EPOCHS1, LR0, LR1, DEMO_EXTRA (extra run.py options).
# The network starts from random weights (no ImageNet download), so step 0 uses lr 0.05 instead of the
# papers' 0.01 (which assumes ImageNet weights); the new class is learned from 15 epochs only, so the
# incremental step uses lr 0.01 instead of the papers' 0.001 (the papers' 40 epochs from ImageNet features).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-demo_out}
TASK=${TASK:-3-1s}
LAST_STEP=${LAST_STEP:-1}
EPOCHS0=${EPOCHS0:-40}
EPOCHS1=${EPOCHS1:-15}
LR0=${LR0:-0.05}
LR1=${LR1:-0.01}
read -r -a extra <<< "${DEMO_EXTRA:-}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
start=$SECONDS

if [ ! -f "$OUT/data/vaihingen/meta.json" ]; then
    "$PY" process_data/make_synthetic_isprs.py --dataset vaihingen --dst "$OUT/raw" --seed 0
    "$PY" process_data/data_process_vaihingen.py --src "$OUT/raw" --dst "$OUT/data" --crop_size 128 --stride 128
fi

common=(--data_root "$OUT/data" --dataset vaihingen --task "$TASK" --backbone resnet18 --no_pretrained
        --crop_size 128 --batch_size 8 --num_workers 1 --val_interval 100 --sample_num 4 --device cpu
        --checkpoint_dir "$OUT/checkpoints" --logdir "$OUT/logs" --results_dir "$OUT/results" "${extra[@]}")
step0="$OUT/checkpoints/step/$TASK-vaihingen_FT_0.pth"

# Step 0 is plain cross-entropy for FT and MiB, and MiCro's differs only by its pixel-contrast term:
# train it once with FT and start every method's step 1 from it, so that only the incremental step differs.
echo "== step 0 of $TASK (shared by the three methods) =="
"$PY" run.py "${common[@]}" --method FT --step 0 --lr "$LR0" --epochs "$EPOCHS0"
for method in FT MiB MiCro; do
    for step in $(seq 1 "$LAST_STEP"); do
        echo "== step $step of $TASK: $method =="
        from_step0=(); [ "$step" = 1 ] && from_step0=(--step_ckpt "$step0")
        "$PY" run.py "${common[@]}" --method "$method" --step "$step" --lr "$LR1" --epochs "$EPOCHS1" "${from_step0[@]}"
    done
done

echo
runs=()
for method in FT MiB MiCro; do
    runs+=(--run "$method" "$OUT/results/vaihingen_${TASK}_$method.csv"
           "$OUT/checkpoints/step/$TASK-vaihingen_${method}_$LAST_STEP.pth")
done
echo "Task $TASK on synthetic Vaihingen, step $LAST_STEP (mIoU %, foreground classes):"
"$PY" scripts/demo_figures.py "${runs[@]}" --step "$LAST_STEP" --out "$OUT/figures" --src "$OUT/raw" \
    --data_root "$OUT/data"
echo "Every step: $PY scripts/summarize_results.py $OUT/results/vaihingen_${TASK}_*.csv"
echo "TensorBoard: tensorboard --logdir $OUT/logs"
echo "demo finished in $((SECONDS - start)) s"
