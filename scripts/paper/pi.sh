#!/usr/bin/env bash
# PI with the papers' protocol on every task (or the tasks given): scripts/paper/pi.sh <dataset> [task ...]
exec bash "$(dirname "$0")/protocol.sh" PI "${1:-vaihingen}" "${@:2}"
