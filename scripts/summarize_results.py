"""Paper tables and figures from results CSVs: python scripts/summarize_results.py results/*.csv

Rows = methods (runs of one method over seeds are grouped: `<name>-s<seed>`, no suffix = seed 42),
column groups = tasks, mIoU old / new / all at each task's final step, mean ± std over seeds.
"""
import argparse
import os
import sys

import tasks
from utils.errors import UserError, exit_on_user_error
from utils.reporting.results import POOLING_KEYS, read_manifests
from utils.reporting.tables import RENDERERS, collect, paper_tables, parse_results_name, per_class_tables, write_tables


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="summarize_results.py", allow_abbrev=False,
        description=__doc__.split("\n\n")[0] + ". " + " ".join(__doc__.split("\n\n")[1].split()),
        epilog="Files are named <dataset>_<task>[-ov]_<name>.csv (as run.py writes them). A file whose "
               "first step was trained from another run's checkpoint (--step_ckpt, e.g. a campaign's "
               "shared step 0) takes the earlier steps from that run's results. Std is the sample "
               "standard deviation (n-1); a cell with fewer seeds than its row says (n=k).")
    parser.add_argument("files", nargs="+", help="results CSV files (e.g. results/*.csv)")
    parser.add_argument("--format", nargs="+", choices=sorted(RENDERERS), default=["md"],
                        help="output formats (default: md); with --out one file per table and format")
    parser.add_argument("--out", default=None,
                        help="folder for the table files (<table>.md/.tex/.csv); default: print to stdout")
    parser.add_argument("--all_steps", action="store_true",
                        help="paper table with one row per method and step instead of the final step only")
    parser.add_argument("--per_class", action="store_true",
                        help="also the per-class IoU table of every task at its final step")
    parser.add_argument("--plot", default=None, metavar="DIR",
                        help="write figures to DIR: mIoU old/new/all over the steps per task, per-class IoU bars")
    parser.add_argument("--order", nargs="+", default=None, metavar="NAME",
                        help="row order of the methods (others follow in the order of the files)")
    parser.add_argument("--strict", action="store_true",
                        help="refuse to pool seeds whose runs differ in effective batch, GPUs, batch-norm sync, "
                             "precision or library versions (default: a warning per table cell)")
    return parser


def make_tables(experiments, all_steps=False, per_class=False, order=None):
    tables = paper_tables(experiments, all_steps=False, order=order)
    if all_steps:
        tables += paper_tables(experiments, all_steps=True, order=order)
    if per_class:
        tables += per_class_tables(experiments, order=order)
    return tables


def pooling_differences(paths) -> list[str]:
    """One line per (experiment, step) whose seeds, pooled into one table cell, were run differently:
    the POOLING_KEYS of their manifests (records without a manifest, from earlier versions, are compared
    on what they have: the effective batch size)."""
    groups: dict[tuple, list] = {}
    for path in paths:
        results = parse_results_name(path)
        groups.setdefault((results.dataset, results.split, results.task, results.experiment), []).append(results)
    lines = []
    for (dataset, split, task, experiment), files in groups.items():
        manifests = {r.seed: read_manifests(r.path) for r in files}
        for step in sorted(set().union(*manifests.values())):
            at = {seed: found[step] for seed, found in manifests.items() if step in found}
            differences = []
            for key in POOLING_KEYS:
                values = {seed: manifest[key] for seed, manifest in at.items() if key in manifest}
                if len({repr(v) for v in values.values()}) > 1:
                    differences.append(f"{key} " + ", ".join(f"{v} (seed {s})" for s, v in sorted(values.items())))
            if differences:
                lines.append(f"{dataset} {task} ({split}) {experiment} step {step} pools seeds run differently: "
                             + "; ".join(differences))
    return lines


@exit_on_user_error
def main(argv=None):
    opts = build_parser().parse_args(argv)
    missing = [p for p in opts.files if not os.path.isfile(p)]
    if missing:
        raise UserError(f"results file {missing[0]} not found; run the steps first")
    differences = pooling_differences(opts.files)
    if differences and opts.strict:
        more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
        raise UserError(f"--strict: {differences[0]}{more}; re-run those seeds alike, or leave out --strict to "
                        f"pool them with a warning")
    for line in differences:
        print(f"warning: {line}", file=sys.stderr)
    experiments = collect(opts.files, tasks.num_steps_if_known, tasks.table_task_order())
    tables = make_tables(experiments, opts.all_steps, opts.per_class, opts.order)
    if opts.out:
        for path in write_tables(tables, opts.out, opts.format):
            print(f"wrote {path}")
    else:
        for fmt in opts.format:
            for table in tables:
                print(RENDERERS[fmt](table))
    if opts.plot:
        from utils.reporting.figures import plot_per_class, plot_steps

        for path in plot_steps(experiments, opts.plot, opts.order) + plot_per_class(experiments, opts.plot, opts.order):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
