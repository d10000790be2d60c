#!/usr/bin/env bash
# MiB-CD with the papers' protocol on every task (or the tasks given): scripts/paper/mib-cd.sh <dataset> [task ...]
exec bash "$(dirname "$0")/protocol.sh" MiB-CD "${1:-vaihingen}" "${@:2}"
