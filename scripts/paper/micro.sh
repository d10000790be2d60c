#!/usr/bin/env bash
# MiCro with the papers' protocol on every task (or the tasks given): scripts/paper/micro.sh <dataset> [task ...]
exec bash "$(dirname "$0")/protocol.sh" MiCro "${1:-vaihingen}" "${@:2}"
