"""Results files -> the tables of a paper: methods x tasks (mIoU old/new/all at the final step, or at
every step), per-class IoU, mean ± std over seeds; rendered as Markdown, LaTeX or CSV.

A results file is `<dataset>_<task>[-ov]_<name>.csv` (utils.reporting.results); a run with --random_seed s other
than 42 is named `<experiment>-s<s>`, so the files of one experiment over seeds are grouped by stripping
that suffix (no suffix = seed 42). A file without the earlier steps (a step 1 trained from a shared
step 0 through --step_ckpt) takes them from the results of the run that checkpoint belongs to.

What the files do not say about a task (its number of steps, the order of the task columns) the caller gives
`collect` (tasks.py's knowledge: `tasks.num_steps_if_known`, `tasks.table_task_order()`).
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError
from utils.reporting.results import read_results
from utils.run_id import RunId, split_seed

SUMMARY = ("miou_old", "miou_new", "miou_all")
SUMMARY_LABELS = {"miou_old": "old", "miou_new": "new", "miou_all": "all"}
_FILE_NAME = re.compile(r"^(?P<dataset>[^_]+)_(?P<task>[^_]+?)(?P<ov>-ov)?_(?P<name>.+)$")


@dataclass(frozen=True)
class ResultsFile:
    path: Path
    dataset: str
    task: str
    overlap: bool
    name: str

    @property
    def run_id(self) -> RunId:
        return RunId.from_run_name(self.dataset, self.task, "-ov" if self.overlap else "", self.name)

    @property
    def split(self) -> str:
        return "overlap" if self.overlap else "disjoint"

    @property
    def experiment(self) -> str:
        return split_seed(self.name)[0]

    @property
    def seed(self) -> int:
        return split_seed(self.name)[1]


def parse_results_name(path) -> ResultsFile:
    path = Path(path)
    match = _FILE_NAME.match(path.stem)
    if path.suffix != ".csv" or match is None:
        raise UserError(f"{path} is not named <dataset>_<task>[-ov]_<name>.csv like the files run.py writes")
    return ResultsFile(path, match["dataset"], match["task"], bool(match["ov"]), match["name"])


def class_columns(row: dict) -> list[str]:
    """The per-class IoU columns of a results row: those between `step` and `miou_old`."""
    keys = list(row)
    end = keys.index("miou_old") if "miou_old" in keys else len(keys)
    return [k for k in keys[:end] if k != "step"]


def load_steps(results: ResultsFile, _depth: int = 0) -> dict[int, dict]:
    """{step: row} of a results file, with the steps before its first one taken from the run whose
    checkpoint its first step started from (its --step_ckpt, recorded in the JSON twin)."""
    rows = {row["step"]: row for row in read_results(results.path)}
    if not rows or min(rows) == 0 or _depth > 8:
        return rows
    first = min(rows)
    json_path = results.path.with_suffix(".json")
    try:
        options = json.loads(json_path.read_text(encoding="utf-8"))["steps"][str(first)]["options"]
    except (OSError, ValueError, KeyError, TypeError):
        return rows
    step_ckpt = options.get("step_ckpt")
    if not step_ckpt:
        return rows
    prefix = results.run_id.tag + "_"
    stem = Path(step_ckpt).stem
    suffix = f"_{first - 1}"
    if not (stem.startswith(prefix) and stem.endswith(suffix)):
        return rows
    source_name = stem[len(prefix):-len(suffix)]
    source = RunId.from_run_name(results.dataset, results.task, results.run_id.split, source_name).results(
        results.path.parent)
    if source_name == results.name or not source.is_file():
        return rows
    earlier = load_steps(ResultsFile(source, results.dataset, results.task, results.overlap, source_name), _depth + 1)
    return {**{s: r for s, r in earlier.items() if s < first}, **rows}


# ---------------------------------------------------------------- aggregation over seeds
@dataclass
class Stat:
    """Mean ± sample standard deviation (n − 1) of one number over seeds."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> float | None:
        if len(self.values) < 2:
            return None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (len(self.values) - 1))


def stat(values) -> Stat | None:
    kept = [v for v in values if v is not None]
    return Stat(kept) if kept else None


@dataclass
class Experiment:
    """One experiment (a method, or a named variant) of one dataset/split/task, over its seeds."""

    dataset: str
    split: str
    task: str
    name: str
    steps_by_seed: dict[int, dict[int, dict]] = field(default_factory=dict)
    num_steps: int | None = None  # the task's number of steps; None: unknown (its last step is the files' last)
    task_rank: int = 0  # place of the task among the table columns (then by name)

    @property
    def seeds(self) -> list[int]:
        return sorted(self.steps_by_seed)

    @property
    def last_step(self) -> int:
        """The task's last step, or the last one in the files for a task of unknown length."""
        if self.num_steps is not None:
            return self.num_steps - 1
        return max(self.steps(), default=0)

    def value(self, step: int, column: str) -> Stat | None:
        return stat(rows[step].get(column) for rows in self.steps_by_seed.values() if step in rows)

    def steps(self) -> list[int]:
        return sorted({s for rows in self.steps_by_seed.values() for s in rows})

    def classes(self, step: int) -> list[str]:
        """Class columns with a value at `step` in some seed, in file order."""
        names = []
        for rows in self.steps_by_seed.values():
            if step in rows:
                names += [c for c in class_columns(rows[step]) if rows[step][c] is not None and c not in names]
        return names


def collect(paths, num_steps: Callable[[str, str], int | None] | None = None,
            task_order: Sequence[str] = ()) -> list[Experiment]:
    """Group results files by (dataset, split, task, experiment) over seeds, in the order given.
    num_steps(dataset, task): the task's number of steps, None if unknown; task_order: the tasks' column
    order in the tables (others after them, by name)."""
    experiments: dict[tuple, Experiment] = {}
    order = list(task_order)
    for path in paths:
        results = parse_results_name(path)
        key = (results.dataset, results.split, results.task, results.experiment)
        exp = experiments.get(key)
        if exp is None:
            exp = experiments[key] = Experiment(
                *key, num_steps=num_steps(results.dataset, results.task) if num_steps else None,
                task_rank=order.index(results.task) if results.task in order else len(order))
        if results.seed in exp.steps_by_seed:
            raise UserError(f"two results files for {results.experiment} seed {results.seed}: {path}")
        exp.steps_by_seed[results.seed] = load_steps(results)
    return list(experiments.values())


# ---------------------------------------------------------------- tables
@dataclass
class Table:
    """Rows of labels + cells under column groups; `groups` is [(group title, [column titles])]."""

    title: str
    key: str  # file stem when written to a folder
    label_titles: list[str]
    groups: list[tuple[str, list[str]]]
    rows: list[tuple[list[str], list[Stat | None]]]
    seeds: list[list[int]]  # per row


def _ordered(experiments, order) -> list[str]:
    names = list(dict.fromkeys(e.name for e in experiments))
    rank = {n: i for i, n in enumerate(order or [])}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), names.index(n)))


def paper_tables(experiments: list[Experiment], all_steps: bool = False, order=None) -> list[Table]:
    """Per (dataset, split): rows = experiments (x steps with all_steps), column groups = tasks with
    mIoU old/new/all at the task's final step (or at each step). Rows without any value are left out."""
    tables = []
    for dataset, split in dict.fromkeys((e.dataset, e.split) for e in experiments):
        exps = [e for e in experiments if (e.dataset, e.split) == (dataset, split)]
        rank = {e.task: e.task_rank for e in exps}
        task_names = sorted(rank, key=lambda t: (rank[t], t))
        by_key = {(e.name, e.task): e for e in exps}
        rows, seeds = [], []
        for name in _ordered(exps, order):
            mine = [by_key.get((name, t)) for t in task_names]
            steps = sorted({s for e in mine if e for s in e.steps()}) if all_steps else [None]
            for step in steps:
                cells = []
                for exp in mine:
                    at = None if exp is None else (exp.last_step if step is None else step)
                    cells += [exp.value(at, col) if exp is not None else None for col in SUMMARY]
                if any(c is not None for c in cells):
                    rows.append(([name] if step is None else [name, str(step)], cells))
                    seeds.append(sorted({s for e in mine if e for s in e.seeds}))
        suffix = "" if split == "disjoint" else "-ov"
        what = "each step" if all_steps else "the final step"
        tables.append(Table(
            title=f"{dataset} ({split}): mIoU (%) old / new / all at {what}, mean ± std over seeds",
            key=f"paper{'_steps' if all_steps else ''}_{dataset}{suffix}",
            label_titles=["method"] + (["step"] if all_steps else []),
            groups=[(t, [SUMMARY_LABELS[c] for c in SUMMARY]) for t in task_names],
            rows=rows, seeds=seeds))
    return tables


def per_class_tables(experiments: list[Experiment], order=None) -> list[Table]:
    """Per (dataset, split, task): rows = experiments, columns = IoU of every class at the final step,
    then mIoU old/new/all."""
    tables = []
    for dataset, split, task in dict.fromkeys((e.dataset, e.split, e.task) for e in experiments):
        exps = {e.name: e for e in experiments if (e.dataset, e.split, e.task) == (dataset, split, task)}
        names = _ordered(exps.values(), order)
        last = next(iter(exps.values())).last_step
        classes = []
        for exp in exps.values():
            classes += [c for c in exp.classes(last) if c not in classes]
        rows, seeds = [], []
        for name in names:
            cells = [exps[name].value(last, c) for c in (*classes, *SUMMARY)]
            if any(c is not None for c in cells):
                rows.append(([name], cells))
                seeds.append(exps[name].seeds)
        suffix = "" if split == "disjoint" else "-ov"
        tables.append(Table(
            title=f"{dataset} {task} ({split}): IoU (%) per class at step {last}, mean ± std over seeds",
            key=f"per_class_{dataset}_{task}{suffix}",
            label_titles=["method"],
            groups=[("IoU", classes), ("mIoU", [SUMMARY_LABELS[c] for c in SUMMARY])],
            rows=rows, seeds=seeds))
    return tables


# ---------------------------------------------------------------- rendering
def _cell_text(cell: Stat | None, n_seeds: int, pm: str, missing: str) -> str:
    if cell is None:
        return missing
    text = f"{cell.mean:.2f}"
    if cell.std is not None:
        text += f"{pm}{cell.std:.2f}"
    if cell.n < n_seeds:
        text += f" (n={cell.n})"
    return text


def to_markdown(table: Table) -> str:
    headers = list(table.label_titles) + [f"{g} {c}" if len(table.groups) > 1 or g != "IoU" else c
                                          for g, cols in table.groups for c in cols] + ["seeds"]
    lines = [f"**{table.title}**", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for (labels, cells), seeds in zip(table.rows, table.seeds):
        texts = [_cell_text(c, len(seeds), " ± ", "–") for c in cells]
        lines.append("| " + " | ".join([*labels, *texts, " ".join(map(str, seeds))]) + " |")
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    return re.sub(r"([_&%#$])", r"\\\1", str(text))


def to_latex(table: Table) -> str:
    n_labels = len(table.label_titles)
    n_cols = sum(len(cols) for _, cols in table.groups)
    lines = [f"% {table.title}", r"\begin{tabular}{" + "l" * n_labels + "c" * n_cols + "}", r"\toprule"]
    group_cells, rules, start = [""] * n_labels, [], n_labels + 1
    for group, cols in table.groups:
        group_cells.append(rf"\multicolumn{{{len(cols)}}}{{c}}{{{_latex_escape(group)}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + len(cols) - 1}}}")
        start += len(cols)
    lines.append(" & ".join(group_cells) + r" \\")
    lines.append(" ".join(rules))
    lines.append(" & ".join([*map(_latex_escape, table.label_titles),
                             *(_latex_escape(c) for _, cols in table.groups for c in cols)]) + r" \\")
    lines.append(r"\midrule")
    for (labels, cells), seeds in zip(table.rows, table.seeds):
        texts = [_cell_text(c, len(seeds), r" $\pm$ ", "--") for c in cells]
        lines.append(" & ".join([*map(_latex_escape, labels), *texts]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """Machine-readable: mean and std in separate columns, then n per cell is implied by `seeds`."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = list(table.label_titles)
    for group, cols in table.groups:
        for col in cols:
            header += [f"{group} {col}", f"{group} {col} std", f"{group} {col} n"]
    writer.writerow(header + ["seeds"])
    for (labels, cells), seeds in zip(table.rows, table.seeds):
        values = []
        for cell in cells:
            if cell is None:
                values += ["", "", "0"]
            else:
                values += [f"{cell.mean:.4f}", "" if cell.std is None else f"{cell.std:.4f}", str(cell.n)]
        writer.writerow([*labels, *values, " ".join(map(str, seeds))])
    return out.getvalue()


RENDERERS = {"md": to_markdown, "latex": to_latex, "csv": to_csv}
EXTENSIONS = {"md": "md", "latex": "tex", "csv": "csv"}


def write_tables(tables: list[Table], out_dir, formats) -> list[Path]:
    """Write every table in every format to `out_dir/<key>.<ext>`; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for table in tables:
        for fmt in formats:
            path = out_dir / f"{table.key}.{EXTENSIONS[fmt]}"
            path.write_text(RENDERERS[fmt](table), encoding="utf-8")
            written.append(path)
    return written
