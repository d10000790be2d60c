#!/usr/bin/env bash
# HCISS with the papers' protocol on every task (or the tasks given): scripts/paper/hciss.sh <dataset> [task ...]
exec bash "$(dirname "$0")/protocol.sh" HCISS "${1:-vaihingen}" "${@:2}"
