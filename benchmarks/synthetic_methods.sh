#!/usr/bin/env bash
# Old/new/all mIoU and training time of every method on synthetic Vaihingen (CPU, ResNet-18, crop 128).
#   benchmarks/synthetic_methods.sh [task ...]      (default: 4-1 2-1s)
# Environment: PYTHON, OUT (default bench_out), EPOCHS0 (30), EPOCHS (15), LR0 (0.05), LR (0.001),
# METHODS (per-task default below), LAST_STEP (default the task's last), CE_STEP0 (below).
# Step 0 starts from random weights, so its lr is higher than the papers' 0.01 (which assumes ImageNet
# weights); later steps use the papers' 0.001 (EWC/RW/PI's penalty needs lr·2·reg_importance < 3.8 to be
# stable with momentum 0.9). Methods whose step 0 is plain cross-entropy (CE_STEP0: FT, LWF, ILT, MiB,
# HCISS, PLOP, MiB+EWF, PLOP+EWF) share FT's step-0 model (`--step_ckpt`), exactly what each would train;
# the others train their own step 0. Same seed, data and epochs for all.
# Then: python benchmarks/summarize_methods.py $OUT
source "$(dirname "$0")/_env.sh"
OUT=${OUT:-bench_out}
EPOCHS0=${EPOCHS0:-30}
EPOCHS=${EPOCHS:-15}
LR0=${LR0:-0.05}
LR=${LR:-0.001}
task_list=("$@")
[ ${#task_list[@]} -gt 0 ] || task_list=(4-1 2-1s)

if [ ! -f "$OUT/data/vaihingen/meta.json" ]; then
    "$PY" process_data/make_synthetic_isprs.py --dataset vaihingen --dst "$OUT/raw" --seed 0
    "$PY" process_data/data_process_vaihingen.py --src "$OUT/raw" --dst "$OUT/data" --crop_size 128 --stride 128 --quiet
fi
common=(--data_root "$OUT/data" --dataset vaihingen --backbone resnet18 --no_pretrained --crop_size 128
        --batch_size 8 --num_workers 1 --val_interval 1000 --random_seed 42 ${EXTRA:-}
        --checkpoint_dir "$OUT/checkpoints" --logdir "$OUT/logs" --results_dir "$OUT/results")
CE_STEP0=${CE_STEP0:-"FT LWF ILT MiB HCISS PLOP MiB+EWF PLOP+EWF"}

for task in "${task_list[@]}"; do
    if [ "$task" = "4-1" ]; then default="FT LWF LWF-MC ILT EWC RW PI MiB HCISS MiCro MiB-CD"
    else default="FT MiB HCISS MiCro MiB-CD"; fi
    n_steps=$("$PY" -c "import tasks; print(tasks.num_steps('vaihingen', '$task'))")
    for method in ${METHODS:-$default}; do
        for step in $(seq 0 "${LAST_STEP:-$((n_steps - 1))}"); do
            ckpt="$OUT/checkpoints/step/${task}-vaihingen_${method}_${step}.pth"
            [ -f "$ckpt" ] && continue
            if [ "$step" -eq 0 ]; then
                if [[ " $CE_STEP0 " == *" $method "* ]] && [ "$method" != FT ]; then continue; fi
                args=(--epochs "$EPOCHS0" --lr "$LR0")
            else
                args=(--epochs "$EPOCHS" --lr "$LR")
                if [ "$step" -eq 1 ] && [[ " $CE_STEP0 " == *" $method "* ]]; then
                    args+=(--step_ckpt "$OUT/checkpoints/step/${task}-vaihingen_FT_0.pth")
                fi
            fi
            echo "== $task $method step $step"
            "$PY" run.py "${common[@]}" --task "$task" --method "$method" --step "$step" "${args[@]}" \
                > "$OUT/${task}_${method}_${step}.out" 2>&1 || { tail -5 "$OUT/${task}_${method}_${step}.out"; exit 1; }
        done
    done
done
"$PY" benchmarks/summarize_methods.py "$OUT"
