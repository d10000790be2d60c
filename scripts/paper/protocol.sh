#!/usr/bin/env bash
# The papers' protocol for one method on the given tasks: DeepLabV3/ResNet-101 (ImageNet weights in
# pretrained/), total batch 24 split over NGPUS processes, 40 epochs, lr 0.01 at step 0 then 0.001,
# crop 512, disjoint split (add --overlap for the overlapped one). A thin call of scripts/campaign.py:
# finished steps are skipped, so re-running after a failure continues where it stopped.
#   scripts/paper/protocol.sh <method> <dataset> [task ...] [-- extra run.py options]
# Environment: NGPUS (default 2, as in the papers), DATA_ROOT (default data), SEEDS (default 42),
#              PYTHON (interpreter), CAMPAIGN_ARGS (more campaign options, e.g. "--dry_run").
set -euo pipefail
cd "$(dirname "$0")/../.."
method=$1 dataset=$2
shift 2
task_list=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do task_list+=("$1"); shift; done
[ $# -gt 0 ] && shift
[ ${#task_list[@]} -gt 0 ] || task_list=(4-1 3-1s 2-1s 1s)
NGPUS=${NGPUS:-2}
if [ $((24 % NGPUS)) -ne 0 ]; then echo "error: NGPUS=$NGPUS must divide the total batch of 24" >&2; exit 2; fi
read -r -a methods <<< "$method"
read -r -a seeds <<< "${SEEDS:-42}"
read -r -a campaign_args <<< "${CAMPAIGN_ARGS:-}"
exec "${PYTHON:-python}" scripts/campaign.py --data_root "${DATA_ROOT:-data}" --datasets "$dataset" \
    --tasks "${task_list[@]}" --methods "${methods[@]}" --seeds "${seeds[@]}" --nproc "$NGPUS" \
    ${campaign_args[@]+"${campaign_args[@]}"} -- \
    --batch_size $((24 / NGPUS)) --epochs 40 --crop_size 512 --backbone resnet101 --output_stride 16 "$@"
