"""The (train, val, test) datasets of one incremental step: its split file, the label remapping of its task, the
data protocol of its family (validation and test crops)."""
import sys

import numpy as np

import tasks
from dataset import layout as data_layout
from dataset.layout import dataset_dir, load_meta, meta_file, process_command, process_script, splits_command
from utils.errors import UserError

from .incremental import IncrementalDataset, default_unseen, label_lut
from .isprs import ISPRSCrops
from .transforms import eval_transform, train_transform

CROSS_VAL_FRACTION = 0.2


def split_file(data_root, dataset, task, step, overlap):
    """Path of the step's split file `<task><suffix>/train-<step>.npy` (dataset/layout.py).

    overlap: a filter mode of the task's family (tasks.FILTER_MODES: suffix '' for its default,
    '-ov' overlap, '-noov' noov) or, as before, a bool (True = overlap, False = the default).
    """
    mode = overlap if isinstance(overlap, str) else ("overlap" if overlap else None)
    suffix = tasks.split_suffix(dataset, task, mode)
    return data_layout.split_file(dataset_dir(data_root, dataset), task, suffix, step)


def data_protocol(opts):
    """The data conventions of a run, with each family's defaults filled in:
    {family, filter_mode, test_unseen ('background'|'ignore'), test_crops ('all'|'step'), val_fraction}."""
    dataset, task = opts.dataset, opts.task
    mode = getattr(opts, "filter_mode", None) or ("overlap" if getattr(opts, "overlap", False) else None)
    synthetic = tasks.synthetic_background(dataset, task)
    val_fraction = getattr(opts, "val_fraction", None)
    if val_fraction is None and getattr(opts, "cross_val", False):
        val_fraction = CROSS_VAL_FRACTION
    return {"family": tasks.family(dataset, task),
            "filter_mode": tasks.check_filter_mode(dataset, task, mode),
            "test_unseen": getattr(opts, "test_unseen", None) or default_unseen(dataset, task),
            "test_crops": getattr(opts, "test_crops", None) or ("step" if synthetic else "all"),
            "val_fraction": val_fraction}


def _load_split(path, n_train_crops, data_root, dataset, task_file=None):
    regenerate = splits_command(data_root, dataset, task_file)
    if not path.is_file():
        raise UserError(f"split file {path} not found; regenerate the split files with `{regenerate}`")
    try:
        indices = np.load(path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read split file {path} ({err}); regenerate it with `{regenerate}`") from None
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer) or (
            len(indices) and (indices.min() < 0 or indices.max() >= n_train_crops)):
        raise UserError(f"split file {path} does not index the {n_train_crops} train crops of "
                        f"meta.json (stale?); regenerate it with `{regenerate}`")
    return np.sort(indices.astype(np.int64))


def get_datasets(opts):
    """(train, val, test) datasets of one incremental step.

    opts: data_root, dataset, task, step, overlap or filter_mode, crop_size, cross_val or
    val_fraction, test_unseen, test_crops, random_seed, no_mask (data_protocol fills in what is missing).
    train: the step's split file, augmented, train remapping. val: the test crops containing a
    class of the step, or with a validation fraction that share of the step's train crops held out
    (seeded); val remapping. test: every test crop (or, with test_crops 'step', those containing a
    class of the step), test remapping with the test_unseen convention.
    Items are (image uint8 [H, W, C], label uint8 [H, W]); `BatchNormalize(meta["mean"], meta["std"])`
    makes a batch of them the float32 [N, C, H, W] normalised input, on the device.
    """
    data_root, dataset, task, step = opts.data_root, opts.dataset, opts.task, opts.step
    tasks.prepare(dataset, data_root, getattr(opts, "task_file", None))
    protocol = data_protocol(opts)
    meta = load_meta(data_root, dataset)
    new_classes, _ = tasks.get_task_labels(dataset, task, step)  # validates task and step

    path = split_file(data_root, dataset, task, step, protocol["filter_mode"])
    if not tasks.is_shipped(dataset, task):  # a task file's task: its split files follow the file, from meta.json
        from process_data.splits import write_splits  # the processing's own split rules
        try:
            write_splits(dataset_dir(data_root, dataset), meta, only_task=task, unchanged_ok=True)
        except OSError as err:
            raise UserError(f"cannot write the split files of task {task} into {dataset_dir(data_root, dataset)} "
                            f"({err.strerror or err}); process a copy of the dataset you can write to") from None
    train_base = ISPRSCrops(data_root, dataset, "train", meta)
    test_base = ISPRSCrops(data_root, dataset, "test", meta)
    indices = _load_split(path, len(train_base), data_root, dataset, getattr(opts, "task_file", None))
    if len(indices) == 0:
        names = ", ".join(tasks.class_names(dataset)[c] for c in new_classes)
        raise UserError(f"step {step} of task {task} has no training crop ({path} is empty: no "
                        f"train crop of {dataset} contains {names}); process more tiles, lower "
                        f"--min_pixels with `python {process_script(dataset)} --dst "
                        f"{data_root} --splits_only --min_pixels N`, or choose another task")

    crop_size = getattr(opts, "crop_size", None) or meta["crop_size"]
    if crop_size > meta["crop_size"]:
        raise UserError(f"--crop_size {crop_size} is larger than the crops stored in "
                        f"{meta_file(dataset_dir(data_root, dataset))} ({meta['crop_size']} px); train "
                        f"with --crop_size {meta['crop_size']} or process the data again with "
                        f"`{process_command(data_root, dataset)} --crop_size {crop_size}`")
    masking = not getattr(opts, "no_mask", False)
    luts = {mode: label_lut(dataset, task, step, mode, unseen=protocol["test_unseen"], masking=masking)
            for mode in ("train", "val", "test")}
    min_pixels = max(int(meta["split"]["min_pixels"]), 1)
    step_test_crops = np.flatnonzero((test_base.class_pixels()[:, new_classes] >= min_pixels).any(axis=1))

    fraction = protocol["val_fraction"]
    if fraction is not None:
        if not 0 < fraction < 1:
            raise UserError(f"--val_fraction {fraction}: give a fraction of the training crops between 0 and 1")
        rng = np.random.default_rng(getattr(opts, "random_seed", 42))
        shuffled = rng.permutation(indices)
        n_val = int(round(fraction * len(shuffled)))
        if len(shuffled) >= 2:
            n_val = min(max(n_val, 1), len(shuffled) - 1)  # keep both sides non-empty
        else:
            n_val = 0
        val_indices, indices = np.sort(shuffled[:n_val]), np.sort(shuffled[n_val:])
        val = IncrementalDataset(train_base, val_indices, luts["val"], eval_transform())
    else:
        if len(step_test_crops) == 0:
            print(f"warning: no test crop of {dataset} contains a class of step {step}; the "
                  f"validation set is empty", file=sys.stderr)
        val = IncrementalDataset(test_base, step_test_crops, luts["val"], eval_transform())

    train = IncrementalDataset(train_base, indices, luts["train"], train_transform(crop_size))
    test_indices = step_test_crops if protocol["test_crops"] == "step" else np.arange(len(test_base))
    test = IncrementalDataset(test_base, test_indices, luts["test"], eval_transform())
    return train, val, test
