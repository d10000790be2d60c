#!/usr/bin/env bash
# ILT with the papers' protocol on every task (or the tasks given): scripts/paper/ilt.sh <dataset> [task ...]
exec bash "$(dirname "$0")/protocol.sh" ILT "${1:-vaihingen}" "${@:2}"
