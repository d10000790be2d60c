"""Incremental view of a crop dataset: the crops of a split file and per-step label remapping.

Remapping (DESIGN §3.5) is a 256-entry lookup table applied to the whole label at once:
- train: classes of the current step -> their channel index; background, old and future
  classes -> 0; 255 (and any unknown value) -> 255;
- val: current-step classes -> index, background 0 kept; old and future classes -> 255;
- test: every class seen up to this step -> index; future classes -> 255.
Without masking (MiB's --no_mask) old classes keep their channel index in train and val labels too.
Channel index = position of the class in the task order (tasks.get_order).
"""
import numpy as np
from torch.utils.data import Dataset

import tasks
from utils.colormap import IGNORE_INDEX

MODES = ("train", "val", "test")
BACKGROUND = 0


def label_lut(dataset, task, step, mode, masking=True):
    """uint8[256] table: remapped label = lut[raw label]. masking=False keeps old classes in train/val."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    new, old = tasks.get_task_labels(dataset, task, step)
    channel = {cls: index for index, cls in enumerate(tasks.get_order(dataset, task))}
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    if mode == "train":
        lut[list(channel)] = 0  # background, old and future classes all become background
        lut[new] = [channel[c] for c in new]
    elif mode == "val":
        lut[BACKGROUND] = channel[BACKGROUND]
        lut[new] = [channel[c] for c in new]
    if mode in ("train", "val") and not masking and old:
        lut[old] = [channel[c] for c in old]
    if mode == "test":
        seen = old + new
        lut[seen] = [channel[c] for c in seen]
    return lut


class IncrementalDataset(Dataset):
    """Items `indices` of `base`, labels remapped through `lut`, then `transform(image, label)`."""

    def __init__(self, base, indices, lut, transform=None):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.lut = np.asarray(lut, dtype=np.uint8)
        self.transform = transform

    def __len__(self):
        return len(self.indices)

    @property
    def names(self):
        return [self.base.names[i] for i in self.indices]

    def __getitem__(self, index):
        image, label = self.base[int(self.indices[index])]
        label = self.lut[label]
        if self.transform is not None:
            image, label = self.transform(image, label)
        return image, label
