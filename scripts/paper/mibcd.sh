#!/usr/bin/env bash
# MiB-CD's experiments (Arnaudo et al., ICIAP 2021) on Potsdam task 6s: FT, UFT + CD, MiB and MiB + CD, on
# RGB and on RGBIR (4 bands), with the recipe of MiB-CD's scripts: AdamW (lr 1e-3, weight decay 1e-2),
# cosine schedule annealed once per step, batch 8, mixed precision (O1), early stopping with patience 25
# on a seeded 10 % validation split keeping the best epoch, invariance factors 0.1 / 0.1 (90° rotations
# and flips), filter mode `split`, synthetic background; steps 0-4 as in the published runs.
# The encoder is this framework's DeepLabV3 / ResNet-101 (MiB-CD's TResNet-M + UNet needs timm); see
# docs/mibcd.md.
#   scripts/paper/mibcd.sh [RGB|RGBIR ...] [-- extra run.py options]
# Environment: DATA_RGB (default data_rgb), DATA_RGBIR (default data_rgbir): data roots processed with
#   python process_data/data_process_potsdam.py --src RAW --dst data_rgbir --channels RGBIR
# NGPUS (default 1; the batch of 8 is split over them), EPOCHS (cap, default 100), LAST_STEP (default 4),
# METHODS (default "FT UFT-CD MiB MiB-CD").
set -euo pipefail
cd "$(dirname "$0")/../.."
band_list=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do band_list+=("$1"); shift; done
[ $# -gt 0 ] && shift
[ ${#band_list[@]} -gt 0 ] || band_list=(RGB RGBIR)
NGPUS=${NGPUS:-1}
if [ $((8 % NGPUS)) -ne 0 ]; then echo "error: NGPUS=$NGPUS must divide the total batch of 8" >&2; exit 2; fi
recipe=(--optimizer adamw --lr 1e-3 --weight_decay 1e-2 --lr_policy cosine --batch_size $((8 / NGPUS))
        --opt_level O1 --patience 25 --val_fraction 0.1 --epochs "${EPOCHS:-100}" --filter_mode split
        --crop_size 512 --backbone resnet101 --output_stride 16)
for bands in "${band_list[@]}"; do
    case $bands in
        RGB) data=${DATA_RGB:-data_rgb} ;;
        RGBIR) data=${DATA_RGBIR:-data_rgbir} ;;
        *) echo "error: unknown band set '$bands'; give RGB and/or RGBIR" >&2; exit 2 ;;
    esac
    for name in ${METHODS:-FT UFT-CD MiB MiB-CD}; do
        case $name in
            FT) method=(FT) ;;
            UFT-CD) method=(UFT --cd_factor 0.1 --cd_factor_icl 0.1) ;;
            MiB) method=(MiB) ;;
            MiB-CD) method=(MiB-CD) ;;  # presets: MiB's + --cd_factor 0.1 --cd_factor_icl 0.1
            *) echo "error: unknown experiment '$name'; use FT, UFT-CD, MiB or MiB-CD" >&2; exit 2 ;;
        esac
        # run_task.sh passes --lr 0.01/0.001 per step; the recipe's --lr 1e-3 comes later and wins
        NPROC=$NGPUS LAST_STEP=${LAST_STEP:-4} bash scripts/run_task.sh potsdam 6s "${method[0]}" \
            --data_root "$data" "${method[@]:1}" --name "${name}-${bands}" "${recipe[@]}" "$@"
    done
done
