#!/usr/bin/env bash
# MiB + EWF with the papers' protocol on every task (or the tasks given):
#   scripts/paper/mib-ewf.sh <dataset> [task ...]   (EWF's own recipe: 30 epochs, add -- --epochs 30)
exec bash "$(dirname "$0")/protocol.sh" MiB+EWF "${1:-vaihingen}" "${@:2}"
