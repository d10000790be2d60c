"""Results files: one CSV row (and a JSON entry) per incremental step, re-runs replace their row."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from utils.checkpoint import atomic_write, split_suffix
from utils.errors import UserError

# New columns go at the end, so that readers indexing the older ones keep working.
SUMMARY_COLUMNS = ("miou_old", "miou_new", "miou_all", "miou_all_bg", "overall_acc", "f1_micro", "f1_macro")
UNDEFINED = "x"


def results_path(results_dir, dataset: str, task: str, overlap, name: str) -> Path:
    """`<results_dir>/<dataset>_<task>[-ov|-noov]_<name>.csv` (overlap: bool or a split suffix, see
    utils.checkpoint.split_suffix); the JSON twin has the same stem."""
    return Path(results_dir) / f"{dataset}_{task}{split_suffix(overlap)}_{name}.csv"


def _percent(value) -> str:
    return UNDEFINED if value is None else f"{100 * value:.2f}"


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [row for row in csv.reader(f) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"cannot read results file {path} ({err}); fix or move it away") from None
    if not rows or rows[0][0] != "step":
        raise UserError(f"results file {path} has no `step, ...` header; move it away and re-run")
    return rows[0], rows[1:]


def write_results(results_dir, dataset: str, task: str, overlap: bool, name: str, step: int, results: dict,
                  class_names, seen_classes, opts: dict) -> Path:
    """Write (or replace) this step's row in the CSV and its entry in the JSON twin; returns the CSV path.

    IoU in percent with 2 decimals; `x` for classes not seen yet, for seen classes without ground
    truth and for undefined summaries (mIoU new at step 0).
    """
    csv_path = results_path(results_dir, dataset, task, overlap, name)
    seen = set(seen_classes)
    header = ["step", *class_names, *SUMMARY_COLUMNS]
    iou = results["iou"]
    class_cells = [_percent(iou[c]) if c in seen and c < len(iou) else UNDEFINED for c in range(len(class_names))]
    row = [str(int(step)), *class_cells, *(_percent(results.get(k)) for k in SUMMARY_COLUMNS)]

    rows_by_step = {}
    if csv_path.exists():
        old_header, old_rows = _read_csv(csv_path)
        if old_header != header:
            raise UserError(f"results file {csv_path} has columns {old_header}, expected {header}; move it away and re-run")
        rows_by_step = {int(r[0]): r for r in old_rows}
    rows_by_step[int(step)] = row

    def write_csv(f):
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows_by_step[s] for s in sorted(rows_by_step))

    atomic_write(csv_path, write_csv, binary=False)

    json_path = csv_path.with_suffix(".json")
    steps = {}
    if json_path.exists():
        try:
            steps = json.loads(json_path.read_text(encoding="utf-8"))["steps"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"cannot read results file {json_path} ({err}); fix or move it away") from None
    steps[str(int(step))] = {
        **results,
        "seen_classes": sorted(seen),
        "class_names": list(class_names),
        "options": opts,
    }
    ordered = {k: steps[k] for k in sorted(steps, key=int)}
    atomic_write(json_path, lambda f: json.dump({"steps": ordered}, f, indent=1, default=str), binary=False)
    return csv_path


def read_results(csv_path) -> list[dict]:
    """Rows of a results CSV as dicts: `step` int, numbers as float percent, `x` / empty as None."""
    path = Path(csv_path)
    if not path.is_file():
        raise UserError(f"results file {path} does not exist; run a step first or check the path")
    header, rows = _read_csv(path)

    def parse(cell: str):
        return None if cell in ("", UNDEFINED) else float(cell)

    return [{"step": int(r[0]), **{col: parse(cell) for col, cell in zip(header[1:], r[1:])}} for r in rows]


def summarize(csv_paths) -> str:
    """Markdown table `method | step | old | new | all` over the given results CSVs (method = file name part)."""
    lines = ["| method | step | old | new | all |", "|---|---|---|---|---|"]

    def show(value) -> str:
        return UNDEFINED if value is None else f"{value:.2f}"

    for path in csv_paths:
        # <dataset>_<task>[-ov]_<name>.csv: dataset and task hold no underscore, the name may.
        parts = Path(path).stem.split("_", 2)
        method = parts[2] if len(parts) == 3 else Path(path).stem
        setting = f" ({parts[0]} {parts[1]})" if len(parts) == 3 else ""
        for row in read_results(path):
            lines.append(f"| {method}{setting} | {row['step']} | {show(row['miou_old'])} | "
                         f"{show(row['miou_new'])} | {show(row['miou_all'])} |")
    return "\n".join(lines)
