#!/usr/bin/env bash
# DFT* with the papers' protocol on every task (or the tasks given): scripts/paper/dft.sh <dataset> [task ...]
# Its preset's learning rates apply (0.02 at step 0, 0.0005 after); its own recipe trained 30 epochs
# (add -- --epochs 30). DFT* never shares FT's step 0 (it allocates every step's classifier from step 0).
exec bash "$(dirname "$0")/protocol.sh" DFTstar "${1:-vaihingen}" "${@:2}"
