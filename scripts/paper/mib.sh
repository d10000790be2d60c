#!/usr/bin/env bash
# MiB with the papers' protocol on every task (or the tasks given): scripts/paper/mib.sh <dataset> [task ...]
exec bash "$(dirname "$0")/protocol.sh" MiB "${1:-vaihingen}" "${@:2}"
