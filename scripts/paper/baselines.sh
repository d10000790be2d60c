#!/usr/bin/env bash
# The baselines CISS papers report since 2021 beside MiB and MiCro, with the papers' protocol, step 0 shared
# where it is identical (FT's by MiB, PLOP, MiB+EWF, PLOP+EWF):
#   scripts/paper/baselines.sh <dataset> [task ...] [-- extra run.py options]
# Environment as protocol.sh.
exec bash "$(dirname "$0")/protocol.sh" "FT MiB PLOP MiB+EWF PLOP+EWF DFTstar MiCro" "${1:-vaihingen}" "${@:2}"
