#!/usr/bin/env bash
# MiB-CD's benchmark on synthetic Potsdam (RGB and RGBIR), task 6s steps 0-2: FT, UFT + CD, MiB, MiB + CD
# with MiB-CD's recipe (AdamW lr 1e-3 wd 1e-2, cosine, early stopping on a 10 % validation split,
# invariance factors 0.1 / 0.1) on a tiny CPU schedule (ResNet-18 from random weights, 64 px crops,
# batch 8, EPOCHS epochs). PATIENCE > 0 adds early stopping; off by default because a few-crop validation
# split of a from-scratch model is flat for the first epochs and would keep an untrained epoch (the 10 %
# validation split is still held out). Step 0 is shared where it is the same training:
# FT and MiB (plain CE), UFT + CD and MiB + CD (CE + invariance). Then:
#   python benchmarks/summarize_mibcd.py $OUT
# Environment: PYTHON, OUT (default bench_mibcd), EPOCHS (6), PATIENCE (0 = off), LAST_STEP (2).
source "$(dirname "$0")/_env.sh"
OUT=${OUT:-bench_mibcd}
EPOCHS=${EPOCHS:-6}
PATIENCE=${PATIENCE:-0}
LAST_STEP=${LAST_STEP:-2}

[ -d "$OUT/raw" ] || "$PY" process_data/make_synthetic_isprs.py --dataset potsdam --dst "$OUT/raw" --seed 0 \
    --tile_size 384 --n_train 6 --n_test 2
for bands in RGB RGBIR; do
    [ -f "$OUT/$bands/potsdam/meta.json" ] || "$PY" process_data/data_process_potsdam.py --src "$OUT/raw" \
        --dst "$OUT/$bands" --channels "$bands" --crop_size 64 --stride 64 --quiet
done

declare -A METHOD=([FT]=FT [UFT-CD]=UFT [MiB]=MiB [MiB-CD]=MiB-CD)
declare -A STEP0=([FT]=FT [UFT-CD]=MiB-CD [MiB]=FT [MiB-CD]=MiB-CD)  # whose step 0 each one continues
for bands in RGB RGBIR; do
    common=(--data_root "$OUT/$bands" --dataset potsdam --task 6s --backbone resnet18 --no_pretrained
            --norm_act iabn --crop_size 64 --batch_size 8 --num_workers 0 --random_seed 42
            --optimizer adamw --lr 1e-3 --weight_decay 1e-2 --lr_policy cosine --epochs "$EPOCHS"
            --val_fraction 0.1 --patience "$PATIENCE" --val_interval 1000
            --checkpoint_dir "$OUT/checkpoints" --logdir "$OUT/logs/$bands" --results_dir "$OUT/results/$bands")
    for name in FT MiB-CD UFT-CD MiB; do
        for step in $(seq 0 "$LAST_STEP"); do
            ckpt="$OUT/checkpoints/step/6s-potsdam_${name}-${bands}_${step}.pth"
            [ -f "$ckpt" ] && continue
            if [ "$step" -eq 0 ] && [ "${STEP0[$name]}" != "$name" ]; then continue; fi
            args=(--method "${METHOD[$name]}" --name "${name}-${bands}" --step "$step")
            if [ "$name" = UFT-CD ]; then args+=(--cd_factor 0.1 --cd_factor_icl 0.1); fi
            if [ "$step" -eq 1 ] && [ "${STEP0[$name]}" != "$name" ]; then
                args+=(--step_ckpt "$OUT/checkpoints/step/6s-potsdam_${STEP0[$name]}-${bands}_0.pth")
            fi
            echo "== $bands $name step $step"
            "$PY" run.py "${common[@]}" "${args[@]}" > "$OUT/${bands}_${name}_${step}.out" 2>&1 \
                || { tail -5 "$OUT/${bands}_${name}_${step}.out"; exit 1; }
        done
    done
done
"$PY" benchmarks/summarize_mibcd.py "$OUT"
