"""Results files: one record per incremental step in `<dataset>_<task>[-ov]_<name>.json`, and the CSV
derived from the same records. Every update takes a file lock, re-reads the records, changes them and
writes the JSON and then the CSV atomically, so concurrent writers lose no row and a reader never
sees half a file. The JSON is the source of truth: a CSV left behind by a kill between the two writes
is rewritten at the next update, and `read_results` reads the records when the JSON is there."""
from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import time
from pathlib import Path

from utils.atomic_files import atomic_write
from utils.errors import UserError

# New columns go at the end, so that readers indexing the older ones keep working.
SUMMARY_COLUMNS = ("miou_old", "miou_new", "miou_all", "miou_all_bg", "overall_acc", "f1_micro", "f1_macro")
# Appended after the per-class and summary columns (their order is part of the file format).
RECORD_COLUMNS = ("kind", "status", "seed", "world_size", "effective_batch_size", "debug", "checkpoint_sha256",
                  "previous_sha256", "git_commit")
INT_COLUMNS = ("seed", "world_size", "effective_batch_size")
UNDEFINED = "x"
FORMAT_VERSION = 2


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


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        steps = json.loads(path.read_text(encoding="utf-8"))["steps"]
        if not isinstance(steps, dict):
            raise TypeError("'steps' is not an object")
        return steps
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read results file {path} ({err}); fix or move it away") from None


@contextlib.contextmanager
def _locked(csv_path: Path):
    """Exclusive lock on `<stem>.lock` beside the results files (held across read-modify-write)."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _header(class_names) -> list[str]:
    return ["step", *class_names, *SUMMARY_COLUMNS, *RECORD_COLUMNS]


def _row(step: str, record: dict, class_names) -> list[str]:
    """The CSV cells of one record."""
    if "csv_cells" in record:  # imported from a CSV written before the JSON held every record
        cells = list(record["csv_cells"])
    elif "iou" in record:
        seen, iou = set(record["seen_classes"]), record["iou"]
        cells = [_percent(iou[c]) if c in seen and c < len(iou) else UNDEFINED for c in range(len(class_names))]
        cells += [_percent(record.get(k)) for k in SUMMARY_COLUMNS]
    else:  # pending: trained, not tested yet
        cells = [UNDEFINED] * (len(class_names) + len(SUMMARY_COLUMNS))
    checkpoint = record.get("checkpoint") or {}
    previous = record.get("previous_checkpoint") or {}
    extra = {"kind": record.get("kind"), "status": record.get("status"), "seed": record.get("seed"),
             "world_size": record.get("world_size"), "effective_batch_size": record.get("effective_batch_size"),
             "debug": {True: "1", False: "0"}.get(record.get("debug"), ""),
             "checkpoint_sha256": checkpoint.get("sha256"), "previous_sha256": previous.get("sha256"),
             "git_commit": record.get("git_commit")}
    return [step, *cells, *("" if extra[k] is None else str(extra[k]) for k in RECORD_COLUMNS)]


def _import_csv(csv_path: Path, class_names) -> dict:
    """Records from a CSV without a JSON twin (files of earlier versions); its first columns must match."""
    header, rows = _read_csv(csv_path)
    fixed = 1 + len(class_names) + len(SUMMARY_COLUMNS)
    expected = _header(class_names)[:fixed]
    oldest = 1 + len(class_names) + SUMMARY_COLUMNS.index("overall_acc") + 1  # columns every version wrote first
    if header[:oldest] != expected[:oldest]:
        raise UserError(f"results file {csv_path} has columns {header}, expected {expected} "
                        f"first; move it away and re-run")
    position = {column: i for i, column in enumerate(header[:fixed])}
    return {r[0]: {"csv_cells": [r[position[c]] if c in position else UNDEFINED for c in expected[1:]],
                   "status": "imported"} for r in rows}


def update_records(csv_path, class_names, change) -> Path:
    """Under the lock: read the records, call `change(steps)` (a dict step -> record, changed in place),
    write the JSON, then the CSV derived from it. Returns the CSV path."""
    csv_path = Path(csv_path)
    json_path = csv_path.with_suffix(".json")
    with _locked(csv_path):
        steps = _read_json(json_path)
        if steps is None:
            steps = _import_csv(csv_path, class_names) if csv_path.exists() else {}
        change(steps)
        ordered = {k: steps[k] for k in sorted(steps, key=int)}
        payload = {"format_version": FORMAT_VERSION, "steps": ordered}
        atomic_write(json_path, lambda f: json.dump(payload, f, indent=1, default=str), binary=False)

        def write_csv(f):
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(_header(class_names))
            writer.writerows(_row(k, record, class_names) for k, record in ordered.items())

        atomic_write(csv_path, write_csv, binary=False)
    return csv_path


def _stale_later_steps(steps: dict, step: int, sha256: str | None) -> list[int]:
    """Mark the records of steps > `step` stale when step+1 was not trained from the checkpoint `sha256`."""
    following = steps.get(str(step + 1))
    previous = (following or {}).get("previous_checkpoint") or {}
    if following is None or sha256 is None or previous.get("sha256") == sha256:
        return []
    marked = []
    for key, record in steps.items():
        if int(key) > step and not str(record.get("status", "")).startswith("stale"):
            record["status"] = f"stale: step {step} re-trained after it"
            marked.append(int(key))
    return sorted(marked)


def mark_pending(csv_path, step: int, record: dict, class_names) -> list[int]:
    """Right after a step's checkpoint is written: its row becomes `pending` (no numbers) until its test
    writes the new ones, and later steps trained from the replaced checkpoint are marked stale.
    Returns the steps marked stale."""
    class_names = list(class_names)
    marked: list[int] = []

    def change(steps):
        steps[str(int(step))] = {**record, "status": "pending", "written_at": _now()}
        marked.extend(_stale_later_steps(steps, int(step), (record.get("checkpoint") or {}).get("sha256")))

    update_records(Path(csv_path), class_names, change)
    return marked


def write_results(csv_path, step: int, results: dict, class_names, seen_classes, opts: dict,
                  record: dict | None = None) -> Path:
    """Write (or replace) this step's record and row in `csv_path` (RunId.results) and its JSON twin;
    returns the CSV path.

    IoU in percent with 2 decimals; `x` for classes not seen yet, for seen classes without ground
    truth and for undefined summaries (mIoU new at step 0). `record` adds the run's provenance (kind,
    seed, world size, effective batch size, git commit, debug, checkpoint and previous checkpoint
    with their sha256). A stale mark survives a re-test of the same checkpoint.
    """
    csv_path = Path(csv_path)
    record = dict(record or {})
    entry = {
        **results,
        "seen_classes": sorted(set(seen_classes)),
        "class_names": list(class_names),
        "options": opts,
        **record,
        "written_at": _now(),
    }
    entry.setdefault("status", "ok")

    def change(steps):
        old = steps.get(str(int(step))) or {}
        same_model = (old.get("checkpoint") or {}).get("sha256") == (record.get("checkpoint") or {}).get("sha256")
        if same_model and str(old.get("status", "")).startswith("stale"):
            entry["status"] = old["status"]
        steps[str(int(step))] = entry
        if record.get("kind") == "train":
            _stale_later_steps(steps, int(step), (record.get("checkpoint") or {}).get("sha256"))

    return update_records(csv_path, list(class_names), change)


# What a manifest records (environment_manifest), and of it what makes numbers of pooled runs incomparable
# (the layout of the processes over nodes does not: the same processes give the same numbers).
POOLING_KEYS = ("effective_batch_size", "device", "gpu_model", "gpu_count", "bn_sync_group", "amp_dtype", "torch",
                "cuda", "cudnn", "nccl", "deterministic", "cudnn_benchmark", "compile", "channels_last")


def environment_manifest(device, world_size: int, processes_per_node: int, nodes: int, launcher: str,
                         options: dict) -> dict:
    """What a step's numbers depend on besides code, data and options: library versions, the GPUs, the
    process layout, precision, batch-norm synchronisation and determinism (docs/clusters.md)."""
    import platform

    import torch

    cuda = getattr(device, "type", str(device)) == "cuda"
    amp = {"O1": "float16", "O2": "bfloat16"}.get(options.get("opt_level"), "float32")
    nccl = None
    if cuda and hasattr(torch.cuda, "nccl"):
        try:
            version = torch.cuda.nccl.version()
            nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except (RuntimeError, AttributeError):
            nccl = None
    return {
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "nccl": nccl,
        "python": platform.python_version(),
        "device": "cuda" if cuda else "cpu",
        "gpu_model": torch.cuda.get_device_name(device) if cuda else None,
        "gpu_count": world_size if cuda else 0,
        "world_size": world_size, "nodes": nodes, "processes_per_node": processes_per_node, "launcher": launcher,
        "effective_batch_size": int(options.get("batch_size") or 0) * world_size,
        "amp_dtype": amp,
        # in-place ABN sync spans every process of the group (models.norm_act.sync_group)
        "bn_sync_group": world_size if options.get("norm_act") == "iabn_sync" else 1,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if cuda else None,
        "compile": bool(options.get("compile")), "channels_last": bool(options.get("channels_last")),
    }


def read_manifests(csv_path) -> dict[int, dict]:
    """{step: what its record says about the environment}: the manifest (files of earlier versions have
    none) with the effective batch size every record has; {} without a JSON twin."""
    steps = _read_json(Path(csv_path).with_suffix(".json")) or {}
    found = {}
    for key, record in steps.items():
        manifest = dict(record.get("manifest") or {})
        if record.get("effective_batch_size") is not None:
            manifest.setdefault("effective_batch_size", record["effective_batch_size"])
        found[int(key)] = manifest
    return found


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _parse(column: str, cell: str):
    if cell in ("", UNDEFINED):
        return None
    if column in RECORD_COLUMNS:
        return int(cell) if column in INT_COLUMNS else cell
    return float(cell)


def read_results(csv_path) -> list[dict]:
    """Rows of a results file as dicts: `step` int, IoU/summary columns as float percent (`x` -> None),
    seed/world_size/effective_batch_size int, other record columns str (empty -> None). The records of
    the JSON twin are read when it exists (the CSV is derived from them)."""
    path = Path(csv_path)
    if not path.is_file():
        raise UserError(f"results file {path} does not exist; run a step first or check the path")
    steps = _read_json(path.with_suffix(".json"))
    header, rows = _read_csv(path)
    if steps is not None:
        n_classes = len(header) - 1 - len(SUMMARY_COLUMNS) - sum(c in RECORD_COLUMNS for c in header)
        class_names = header[1:1 + n_classes]
        header = _header(class_names)
        rows = [_row(k, record, class_names) for k, record in sorted(steps.items(), key=lambda kv: int(kv[0]))]
    return [{"step": int(r[0]), **{col: _parse(col, cell) for col, cell in zip(header[1:], r[1:])}} for r in rows]

