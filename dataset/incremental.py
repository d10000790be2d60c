"""Incremental view of a crop dataset: the crops of a split file and per-step label remapping.

Remapping (docs/data.md#label-remapping-per-step) is a 256-entry lookup table applied to the whole label at once; the
task's family (tasks.py) fixes the background channel 0 and the channel of every class.
MiCro's family (the first class of step 0 is the background, ISPRS clutter; channel = position in the task order):
- train: classes of the current step -> their channel; the background, old and future classes -> 0;
- val: current-step classes -> channel, the background 0 kept; old and future classes -> 255;
- test: every class seen up to this step -> channel; unseen (future) classes -> 255.
MiB-CD's family (synthetic background 0, channel = 1 + position in the task order):
- train and val: classes of the current step -> their channel; every other class -> 0;
- test: every class seen up to this step -> channel; unseen classes -> 0 (background).
`unseen` ("background" or "ignore") overrides the test convention of either family.
255 (the eroded boundaries) and any unknown value -> 255 in every mode.
Without masking (MiB's --no_mask) old classes keep their channel in train and val labels too.
"""
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

import tasks
from dataset.colormap import IGNORE_INDEX

MODES = ("train", "val", "test")
UNSEEN_CONVENTIONS = ("background", "ignore")
BACKGROUND = 0  # the background channel of both families (MiCro's: that of the task's first class)


def default_unseen(dataset, task):
    """Test labels of classes not seen yet: MiB-CD -> background, MiCro (MiB) -> ignore."""
    return "background" if tasks.synthetic_background(dataset, task) else "ignore"


def label_lut(dataset, task, step, mode, unseen=None, masking=True):
    """uint8[256] table: remapped label = lut[raw label]. `unseen` only affects mode 'test';
    masking=False keeps old classes in train/val labels (MiB's --no_mask)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    unseen = unseen or default_unseen(dataset, task)
    if unseen not in UNSEEN_CONVENTIONS:
        raise ValueError(f"unseen must be one of {UNSEEN_CONVENTIONS}, not {unseen!r}")
    new, old = tasks.get_task_labels(dataset, task, step)
    channel = tasks.channel_of(dataset, task)
    synthetic = tasks.synthetic_background(dataset, task)
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    if mode == "train" or (mode == "val" and synthetic):
        lut[list(channel)] = BACKGROUND  # background, old and future classes all become background
    elif mode == "val":
        background = tasks.get_order(dataset, task)[0]
        lut[background] = channel[background]
    else:
        if unseen == "background":
            lut[list(channel)] = BACKGROUND
        new = old + new
    if mode in ("train", "val") and not masking and old:
        lut[old] = [channel[c] for c in old]
    lut[new] = [channel[c] for c in new]
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

    def __getitem__(self, item):
        """item: a position, or (position, seed) from SeededSampler: then the transform's random draws come
        from torch's generator seeded with `seed` for this item alone (the caller's state is put back)."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        image, label = self.base[int(self.indices[index])]
        label = self.lut[label]
        if self.transform is None:
            return image, label
        if seed is None:
            return self.transform(image, label)
        cpu_rng = torch.default_generator  # only the CPU generator: torch.manual_seed also visits accelerators
        saved = cpu_rng.get_state()
        try:
            cpu_rng.manual_seed(seed)
            return self.transform(image, label)
        finally:
            cpu_rng.set_state(saved)

    @property
    def names(self):
        return [self.base.names[i] for i in self.indices]


class SeededSampler(Sampler):
    """The positions of `sampler`, each paired with the seed of its augmentation: (position, seed).

    The seeds are drawn in the main process from `generator` (the one RandomSampler shuffles with, or a
    per-rank one beside DistributedSampler), so a training item's augmentation depends on the run's seed
    and the epoch only: not on how many loader workers run, nor on workers restarted by a resume."""

    def __init__(self, sampler, generator: torch.Generator):
        self.sampler = sampler
        self.generator = generator

    def __iter__(self):
        positions = list(self.sampler)
        seeds = torch.randint(0, 2 ** 62, (len(positions),), generator=self.generator).tolist()
        return iter(zip(positions, seeds))

    def __len__(self):
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
