#!/usr/bin/env bash
# The demo: synthetic Vaihingen -> processing -> task 4-1 (steps 0 and 1) with FT, MiB and MiCro on a
# small ResNet-18 on the CPU -> the old/new/all table. About 5 minutes on 2 cores.
# Everything goes to demo_out/ (delete it to start over). Environment: PYTHON, EPOCHS0, EPOCHS1, LR0, LR1.
# The network starts from random weights (no ImageNet download), so step 0 uses lr 0.05 instead of the
# papers' 0.01 (which assumes ImageNet weights); step 1 uses the papers' 0.001.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=demo_out
EPOCHS0=${EPOCHS0:-40}
EPOCHS1=${EPOCHS1:-15}
LR0=${LR0:-0.05}
LR1=${LR1:-0.001}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

if [ ! -f "$OUT/data/vaihingen/meta.json" ]; then
    "$PY" process_data/make_synthetic_isprs.py --dataset vaihingen --dst "$OUT/raw" --seed 0
    "$PY" process_data/data_process_vaihingen.py --src "$OUT/raw" --dst "$OUT/data" --crop_size 128 --stride 128
fi

common=(--data_root "$OUT/data" --dataset vaihingen --task 4-1 --backbone resnet18 --no_pretrained
        --crop_size 128 --batch_size 8 --num_workers 1 --val_interval 100 --sample_num 4
        --checkpoint_dir "$OUT/checkpoints" --logdir "$OUT/logs" --results_dir "$OUT/results")
step0="$OUT/checkpoints/step/4-1-vaihingen_FT_0.pth"

# Step 0 (classes 0-4) is the same cross-entropy training for the three methods: train it once.
echo "== step 0: FT (shared by the three methods) =="
"$PY" run.py "${common[@]}" --method FT --step 0 --lr "$LR0" --epochs "$EPOCHS0"
for method in FT MiB MiCro; do
    echo "== step 1 (class car): $method =="
    "$PY" run.py "${common[@]}" --method "$method" --step 1 --lr "$LR1" --epochs "$EPOCHS1" --step_ckpt "$step0"
done

echo
echo "Task 4-1 on synthetic Vaihingen (mIoU %, foreground classes; old = classes of step 0, new = car):"
"$PY" scripts/summarize_results.py "$OUT"/results/vaihingen_4-1_FT.csv "$OUT"/results/vaihingen_4-1_MiB.csv \
    "$OUT"/results/vaihingen_4-1_MiCro.csv
echo "TensorBoard: tensorboard --logdir $OUT/logs"
