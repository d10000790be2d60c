"""ISPRS crop datasets, the incremental wrapper (split files + label remapping) and joint transforms."""
import sys

import numpy as np

import tasks
from utils.colormap import CLASS_NAMES
from utils.errors import UserError

from .incremental import IncrementalDataset, label_lut
from .isprs import ISPRSCrops, dataset_dir, load_meta
from .transforms import BatchNormalize, eval_transform, train_transform

__all__ = ["get_datasets", "load_meta", "split_file", "ISPRSCrops", "IncrementalDataset", "label_lut",
           "BatchNormalize"]

CROSS_VAL_FRACTION = 0.2


def split_file(data_root, dataset, task, step, overlap):
    """Path of the step's split file: `<task>/train-<step>.npy` (disjoint) or `<task>-ov/...`."""
    return dataset_dir(data_root, dataset) / (task + ("-ov" if overlap else "")) / f"train-{step}.npy"


def _load_split(path, n_train_crops, data_root, dataset):
    regenerate = (f"python process_data/data_process_{dataset}.py --dst {data_root} --splits_only")
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

    opts: data_root, dataset, task, step, overlap, crop_size, cross_val, random_seed.
    train: the step's split file, augmented, train remapping. val (monitoring only): the test
    crops containing a class of the step, or with cross_val 20 % of the step's train crops
    held out (seeded); val remapping. test: every test crop, test remapping.
    Items are (image uint8 [H, W, C], label uint8 [H, W]); `BatchNormalize(meta["mean"], meta["std"])`
    makes a batch of them the float32 [N, C, H, W] normalised input, on the device.
    """
    data_root, dataset, task, step = opts.data_root, opts.dataset, opts.task, opts.step
    overlap = bool(getattr(opts, "overlap", False))
    meta = load_meta(data_root, dataset)
    new_classes, _ = tasks.get_task_labels(dataset, task, step)  # validates task and step

    path = split_file(data_root, dataset, task, step, overlap)
    train_base = ISPRSCrops(data_root, dataset, "train", meta)
    test_base = ISPRSCrops(data_root, dataset, "test", meta)
    indices = _load_split(path, len(train_base), data_root, dataset)
    if len(indices) == 0:
        names = ", ".join(CLASS_NAMES[c] for c in new_classes)
        raise UserError(f"step {step} of task {task} has no training crop ({path} is empty: no "
                        f"train crop of {dataset} contains {names}); process more tiles, lower "
                        f"--min_pixels with `python process_data/data_process_{dataset}.py --dst "
                        f"{data_root} --splits_only --min_pixels N`, or choose another task")

    crop_size = getattr(opts, "crop_size", None) or meta["crop_size"]
    if crop_size > meta["crop_size"]:
        raise UserError(f"--crop_size {crop_size} is larger than the crops stored in "
                        f"{dataset_dir(data_root, dataset) / 'meta.json'} ({meta['crop_size']} px); train "
                        f"with --crop_size {meta['crop_size']} or process the data again with "
                        f"`python process_data/data_process_{dataset}.py --src RAW --dst {data_root} "
                        f"--crop_size {crop_size}`")
    luts = {mode: label_lut(dataset, task, step, mode) for mode in ("train", "val", "test")}

    if getattr(opts, "cross_val", False):
        rng = np.random.default_rng(getattr(opts, "random_seed", 42))
        shuffled = rng.permutation(indices)
        n_val = int(round(CROSS_VAL_FRACTION * len(shuffled)))
        if len(shuffled) >= 2:
            n_val = min(max(n_val, 1), len(shuffled) - 1)  # keep both sides non-empty
        else:
            n_val = 0
        val_indices, indices = np.sort(shuffled[:n_val]), np.sort(shuffled[n_val:])
        val = IncrementalDataset(train_base, val_indices, luts["val"], eval_transform())
    else:
        min_pixels = max(int(meta["split"]["min_pixels"]), 1)
        present = test_base.class_pixels()[:, new_classes] >= min_pixels
        val_indices = np.flatnonzero(present.any(axis=1))
        if len(val_indices) == 0:
            print(f"warning: no test crop of {dataset} contains a class of step {step}; the "
                  f"validation set is empty", file=sys.stderr)
        val = IncrementalDataset(test_base, val_indices, luts["val"], eval_transform())

    train = IncrementalDataset(train_base, indices, luts["train"], train_transform(crop_size))
    test = IncrementalDataset(test_base, np.arange(len(test_base)), luts["test"], eval_transform())
    return train, val, test
