"""The (train, val, test) datasets of one incremental step (its settled options: dataset/options.py): its split
file, the label remapping of its task, its validation and test crops."""
import sys

import numpy as np

import tasks
from dataset import layout as data_layout
from dataset.layout import dataset_dir, load_meta, meta_file, process_command, process_script, splits_command
from utils.errors import UserError

from .incremental import IncrementalDataset, label_lut
from .isprs import ISPRSCrops
from .options import DataOptions
from .transforms import eval_transform, train_transform


def split_file(data_root, dataset, task, step, overlap):
    """Path of the step's split file `<task><suffix>/train-<step>.npy` (dataset/layout.py).

    overlap: a filter mode of the task's family (tasks.FILTER_MODES: suffix '' for its default,
    '-ov' overlap, '-noov' noov) or, as before, a bool (True = overlap, False = the default).
    """
    mode = overlap if isinstance(overlap, str) else ("overlap" if overlap else None)
    suffix = tasks.split_suffix(dataset, task, mode)
    return data_layout.split_file(dataset_dir(data_root, dataset), task, suffix, step)


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


def get_datasets(data: DataOptions):
    """(train, val, test) datasets of one incremental step of `data` (dataset.options.DataOptions).

    train: the step's split file, augmented, train remapping. val: the test crops containing a
    class of the step, or with a validation fraction that share of the step's train crops held out
    (seeded); val remapping. test: every test crop (or, with test_crops 'step', those containing a
    class of the step), test remapping with the test_unseen convention.
    Items are (image uint8 [H, W, C], label uint8 [H, W]); `BatchNormalize(meta["mean"], meta["std"])`
    makes a batch of them the float32 [N, C, H, W] normalised input, on the device.
    """
    data_root, dataset, task, step = data.data_root, data.dataset, data.task, data.step
    meta = load_meta(data_root, dataset)
    new_classes, _ = tasks.get_task_labels(dataset, task, step)  # validates task and step

    path = split_file(data_root, dataset, task, step, data.filter_mode)
    if not tasks.is_shipped(dataset, task):  # a task file's task: its split files follow the file, from meta.json
        from process_data.splits import write_splits  # the processing's own split rules
        try:
            write_splits(dataset_dir(data_root, dataset), meta, only_task=task, unchanged_ok=True)
        except OSError as err:
            raise UserError(f"cannot write the split files of task {task} into {dataset_dir(data_root, dataset)} "
                            f"({err.strerror or err}); process a copy of the dataset you can write to") from None
    train_base = ISPRSCrops(data_root, dataset, "train", meta)
    test_base = ISPRSCrops(data_root, dataset, "test", meta)
    indices = _load_split(path, len(train_base), data_root, dataset, data.task_file)
    if len(indices) == 0:
        names = ", ".join(tasks.class_names(dataset)[c] for c in new_classes)
        raise UserError(f"step {step} of task {task} has no training crop ({path} is empty: no "
                        f"train crop of {dataset} contains {names}); process more tiles, lower "
                        f"--min_pixels with `python {process_script(dataset)} --dst "
                        f"{data_root} --splits_only --min_pixels N`, or choose another task")

    crop_size = data.crop_size or meta["crop_size"]
    if crop_size > meta["crop_size"]:
        raise UserError(f"--crop_size {crop_size} is larger than the crops stored in "
                        f"{meta_file(dataset_dir(data_root, dataset))} ({meta['crop_size']} px); train "
                        f"with --crop_size {meta['crop_size']} or process the data again with "
                        f"`{process_command(data_root, dataset)} --crop_size {crop_size}`")
    masking = not data.no_mask
    luts = {mode: label_lut(dataset, task, step, mode, unseen=data.test_unseen, masking=masking)
            for mode in ("train", "val", "test")}
    min_pixels = max(int(meta["split"]["min_pixels"]), 1)
    step_test_crops = np.flatnonzero((test_base.class_pixels()[:, new_classes] >= min_pixels).any(axis=1))

    fraction = data.val_fraction
    if fraction is not None:
        rng = np.random.default_rng(data.random_seed)
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
    test_indices = step_test_crops if data.test_crops == "step" else np.arange(len(test_base))
    test = IncrementalDataset(test_base, test_indices, luts["test"], eval_transform())
    return train, val, test
