#!/usr/bin/env bash
# PLOP + EWF with the papers' protocol on every task (or the tasks given):
#   scripts/paper/plop-ewf.sh <dataset> [task ...]   (EWF's own recipe: 30 epochs, add -- --epochs 30)
exec bash "$(dirname "$0")/protocol.sh" PLOP+EWF "${1:-vaihingen}" "${@:2}"
