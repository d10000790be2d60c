"""The on-disk contract of a processed dataset, shared by its writer (process_data/) and its reader (dataset/).

It owns the dataset names, the meta.json format version, the folder layout (docs/data.md#processed-layout),
the validated reading and the atomic writing of meta.json and of split files, and the commands that
(re)make a processed dataset, which the reader's error messages name. The crop-store arrays and their
meta.json entry are dataset/crop_store.py's.

    <data_root>/<dataset>/              dataset_dir
        meta.json                       meta_file, load_meta / write_meta
        <split>/{images,labels}.npy     crop store (dataset/crop_store.py), split = train | test
        <split>/{images,labels}/*.png   PNG crops (png_dir)
        <task><suffix>/train-<step>.npy split_file (suffix: tasks.FILTER_MODES)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from utils.atomic_files import atomic_write
from utils.dataset_spec import BUILTIN_DATASETS
from utils.errors import UserError

# The built-in datasets (utils/specs/); any other folder name under a data root holding a meta.json
# processed from a dataset spec is a dataset too.
DATASETS = BUILTIN_DATASETS
META_VERSION = 1
SPLITS = ("train", "test")
GENERIC_SCRIPT = "process_data/process_dataset.py"


# ---------------------------------------------------------------------------------------------- paths
def dataset_dir(data_root, dataset) -> Path:
    return Path(data_root) / dataset


def meta_file(folder) -> Path:
    """meta.json of the dataset folder `folder` (a dataset_dir, or the folder being processed)."""
    return Path(folder) / "meta.json"


def split_folder(task: str, suffix: str) -> str:
    """Name of a split folder, also its key in meta["split"]["sizes"]: `<task><suffix>`."""
    return task + suffix


def split_file(folder, task: str, suffix: str, step: int) -> Path:
    """`<folder>/<task><suffix>/train-<step>.npy`: sorted int64 positions in meta["train"]["crops"]."""
    return Path(folder) / split_folder(task, suffix) / f"train-{step}.npy"


def png_dir(folder, split: str, kind: str) -> Path:
    """Folder of the PNG crops (kind images or labels) of a split: `<folder>/<split>/<kind>/`."""
    return Path(folder) / split / kind


# ------------------------------------------------------------------- commands that (re)make the data
def process_script(dataset) -> str:
    """The processing command of a dataset without its data options (a dataset of your own: from its spec)."""
    if dataset in DATASETS:
        return f"process_data/data_process_{dataset}.py"
    return f"{GENERIC_SCRIPT} --spec SPEC"


def process_command(data_root, dataset) -> str:
    """Processing the raw archives again into `data_root`."""
    return f"python {process_script(dataset)} --src RAW --dst {data_root}"


def splits_command(data_root, dataset, task_file=None) -> str:
    """Rewriting the split files (of the dataset's tasks and those of `task_file`) from meta.json."""
    extra = f" --task_file {task_file}" if task_file else ""
    return f"python {process_script(dataset)} --dst {data_root} --splits_only{extra}"


def convert_command(data_root, dataset) -> str:
    """Converting PNG crops into the crop store."""
    return f"python process_data/make_crop_store.py --data_root {data_root} --dataset {dataset}"


# --------------------------------------------------------------------------------------------- meta.json
def meta_header(dataset) -> dict:
    """The first keys of every meta.json, those load_meta checks."""
    return {"format_version": META_VERSION, "dataset": dataset}


def read_meta(path, missing: str, unreadable: str) -> dict:
    """The content of the meta.json at `path`; UserError `<path> not found: <missing>` or
    `cannot read <path> (<reason>); <unreadable>`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: {missing}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({err}); {unreadable}") from None


def check_meta(meta, path, data_root, dataset) -> dict:
    """`meta` when it is a meta.json of `dataset` in this code's format; a UserError otherwise."""
    if meta.get("format_version") != META_VERSION or meta.get("dataset") != dataset:
        raise UserError(f"{path} is not a meta.json of {dataset} in format {META_VERSION}; run "
                        f"`{process_command(data_root, dataset)}` again")
    return meta


def load_meta(data_root, dataset) -> dict:
    """meta.json of a processed dataset; a clear UserError when it is missing or unreadable."""
    path = meta_file(dataset_dir(data_root, dataset))
    if dataset not in DATASETS and not path.is_file():
        raise UserError(f"unknown dataset {dataset!r}: neither built in ({', '.join(DATASETS)}) nor processed "
                        f"in {data_root}; process a dataset of your own first with `python {GENERIC_SCRIPT} "
                        f"--spec SPEC --src RAW --dst {data_root}`")
    command = process_command(data_root, dataset)
    meta = read_meta(path, f"{data_root} holds no processed {dataset}; run `{command}` first",
                     f"run `{command}` again")
    return check_meta(meta, path, data_root, dataset)


def _format_meta(meta) -> str:
    """JSON with one line per key of the first two levels; lists stay on one line (readable, small)."""
    def block(obj, indent):
        if not isinstance(obj, dict) or indent > 1:
            return json.dumps(obj)
        pad = " " * (indent + 1)
        items = ",\n".join(f"{pad}{json.dumps(k)}: {block(v, indent + 1)}" for k, v in obj.items())
        return "{\n" + items + "\n" + " " * indent + "}"
    return block(meta, 0) + "\n"


def write_meta(folder, meta) -> Path:
    """Write meta.json into the dataset folder `folder` atomically (never half a file)."""
    text = _format_meta(meta)
    return atomic_write(meta_file(folder), lambda f: f.write(text), binary=False)


def save_npy(path, array) -> Path:
    """np.save `array` to `path` atomically (parent folders created)."""
    return atomic_write(path, lambda f: np.save(f, array))
