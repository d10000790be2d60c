#!/usr/bin/env bash
# Run every step of a task with one method, chaining steps through checkpoints.
#   scripts/run_task.sh <dataset> <task> <method> [extra run.py options...]
# Environment: NPROC (processes per node; >1 launches torchrun), PYTHON (interpreter),
#              FIRST_STEP / LAST_STEP (sub-range of steps). The learning rate is run.py's default
#              (0.01 at step 0, 0.001 after: the papers' schedule; a method's own pair, e.g. DFT*'s) unless an
#              extra --lr is given.
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 <dataset> <task> <method> [run.py options...]" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
dataset=$1 task=$2 method=$3
shift 3
PY=${PYTHON:-python}
NPROC=${NPROC:-1}
n_steps=$("$PY" -c "import sys, tasks; from utils.errors import UserError
try: print(tasks.num_steps('$dataset', '$task'))
except UserError as e: sys.exit(f'error: {e}')")
first=${FIRST_STEP:-0}
last=${LAST_STEP:-$((n_steps - 1))}

for step in $(seq "$first" "$last"); do
    args=(run.py --dataset "$dataset" --task "$task" --method "$method" --step "$step" "$@")
    echo "== $method $dataset $task step $step =="
    if [ "$NPROC" -gt 1 ]; then
        "$PY" -m torch.distributed.run --nproc_per_node="$NPROC" "${args[@]}"
    else
        "$PY" "${args[@]}"
    fi
done
