#!/usr/bin/env bash
# EWC with the papers' protocol on every task (or the tasks given): scripts/paper/ewc.sh <dataset> [task ...]
exec bash "$(dirname "$0")/protocol.sh" EWC "${1:-vaihingen}" "${@:2}"
