# Sourced first by the shell benchmarks: strict mode, the repository root as working folder, the
# interpreter ($PY: $PYTHON, default .venv/bin/python) and every core for torch unless OMP_NUM_THREADS is set.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
