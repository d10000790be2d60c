#!/usr/bin/env bash
# LWF with the papers' protocol on every task (or the tasks given): scripts/paper/lwf.sh <dataset> [task ...]
exec bash "$(dirname "$0")/protocol.sh" LWF "${1:-vaihingen}" "${@:2}"
