#!/usr/bin/env bash
# Create or reuse the virtual environment and install everything, torch first.
# Usage: scripts/setup_env.sh [VENV]   (default .venv). Re-running skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
    echo "[setup] creating virtual environment $VENV"
    python3 -m venv "$VENV"
fi
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# 1. torch first, so nothing later pulls a different build. On a machine without CUDA this is the
#    CPU wheel pip finds locally; with CUDA the same version comes as the CUDA build.
if "$PY" -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 1))" 2>/dev/null; then
    echo "[setup] torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"
else
    echo "[setup] installing torch==2.13.0"
    pip_install "torch==2.13.0"
fi

# 2. in-place ABN compiles against the installed torch (no build isolation). Optional: without it
#    the pure-PyTorch ABN is used, which loads the same checkpoints.
if "$PY" -c "import inplace_abn" 2>/dev/null; then
    echo "[setup] inplace-abn already installed"
else
    echo "[setup] building inplace-abn (about 80 s)"
    pip_install setuptools_scm wheel
    pip_install --no-build-isolation inplace-abn \
        || echo "[setup] WARNING: inplace-abn did not build; the pure-PyTorch ABN will be used"
fi

# 3. the rest (torch is already satisfied, so no download of it happens here).
pip_install -r requirements.txt

# 4. the project itself, editable (pyproject.toml): run, methods, dataset, ... import from any folder.
#    No build isolation: the installed setuptools builds it, nothing is downloaded for the build.
pip_install "setuptools>=64" wheel  # setuptools < 70.1 needs wheel to build the editable install
pip_install --no-deps --no-build-isolation -e .
echo "[setup] environment ready: $VENV"
