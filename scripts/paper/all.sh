#!/usr/bin/env bash
# Every method of the MiCro paper with the papers' protocol, step 0 shared where it is identical:
#   scripts/paper/all.sh <dataset> [task ...] [-- extra run.py options]
# Environment as protocol.sh (NGPUS, DATA_ROOT, SEEDS="1 2 3" for mean ± std over seeds, PYTHON).
exec bash "$(dirname "$0")/protocol.sh" "FT LWF LWF-MC ILT EWC RW PI MiB HCISS MiCro" "${1:-vaihingen}" "${@:2}"
