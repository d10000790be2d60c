#!/usr/bin/env bash
# LWF-MC with the papers' protocol on every task (or the tasks given): scripts/paper/lwf-mc.sh <dataset> [task ...]
exec bash "$(dirname "$0")/protocol.sh" LWF-MC "${1:-vaihingen}" "${@:2}"
