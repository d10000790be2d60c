#!/usr/bin/env bash
# PLOP with the papers' protocol on every task (or the tasks given): scripts/paper/plop.sh <dataset> [task ...]
# (the MiCro papers' 40 epochs for every method; PLOP's own recipe trained 30: add -- --epochs 30)
exec bash "$(dirname "$0")/protocol.sh" PLOP "${1:-vaihingen}" "${@:2}"
