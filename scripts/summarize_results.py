"""Print the old/new/all table of one or more results CSVs: python scripts/summarize_results.py results/*.csv"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from utils.errors import UserError, exit_on_user_error  # noqa: E402
from utils.results import summarize  # noqa: E402


@exit_on_user_error
def main(paths):
    if not paths:
        raise UserError("give one or more results CSV files, e.g. results/vaihingen_4-1_MiB.csv")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"results file {missing[0]} not found; run the steps first")
    print(summarize(paths))


if __name__ == "__main__":
    main(sys.argv[1:])
