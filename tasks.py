"""Incremental tasks per dataset, in two families with their own label convention (docs/data.md#tasks).

A task maps each step to the ISPRS classes it introduces (0 clutter, 1 impervious surfaces,
2 building, 3 low vegetation, 4 tree, 5 car; utils/colormap.py). The family fixes what the
model's channel 0 (background) is:

- MiCro's family (`TASKS`: 4-1, 3-1s, 2-1s, 1s, offline): clutter is the background class;
  channel = position of the class in the task order (`get_order`).
- MiB-CD's family (`MIBCD_TASKS`: 6s, 222a, 321, mibcd-offline): every ISPRS class, clutter
  included, is learnable; channel 0 is a synthetic background that absorbs everything not (yet)
  learned, then the classes follow in step order (channel = 1 + position).

The raw-class helpers (`get_task_labels`, `get_order`) never list the synthetic background;
the channel helpers (`get_per_task_classes`, `channel_of`, `channel_names`) do.
"""
import operator

import numpy as np

from utils.colormap import CLASS_NAMES
from utils.data_layout import DATASETS
from utils.errors import UserError

MICRO, MIBCD = "micro", "mibcd"
BACKGROUND_CHANNEL = 0
SYNTHETIC_BACKGROUND_NAME = "background"

_ISPRS_TASKS = {
    "offline": {0: [0, 1, 2, 3, 4, 5]},
    "4-1": {0: [0, 1, 2, 3, 4], 1: [5]},
    "3-1s": {0: [0, 1, 2, 3], 1: [4], 2: [5]},
    "2-1s": {0: [0, 1, 2], 1: [3], 2: [4], 3: [5]},
    "1s": {0: [0, 1], 1: [2], 2: [3], 3: [4], 4: [5]},
}

# MiB-CD (Arnaudo et al., ICIAP 2021): names and step order of its tasks.
_MIBCD_TASKS = {
    "mibcd-offline": {0: [0, 1, 2, 3, 4, 5]},
    "6s": {0: [2], 1: [4], 2: [1], 3: [3], 4: [5], 5: [0]},  # building, tree, imp., low veg., car, clutter
    "222a": {0: [1, 3], 1: [2, 4], 2: [5, 0]},
    "321": {0: [2, 4, 0], 1: [1, 3], 2: [5]},
}

# Filter modes (which training crops a step uses) per family; the first is the family's default.
# Value: suffix of the split folder `<task><suffix>/train-<step>.npy` (and of run tags).
FILTER_MODES = {
    MICRO: {"disjoint": "", "overlap": "-ov"},
    MIBCD: {"split": "", "overlap": "-ov", "noov": "-noov"},
}


def _copy(task_dict):
    return {task: {step: list(classes) for step, classes in steps.items()} for task, steps in task_dict.items()}


# Same tasks for every dataset (utils/data_layout.py); separate dicts so adding a task to one leaves the others alone.
TASKS = {dataset: _copy(_ISPRS_TASKS) for dataset in DATASETS}  # MiCro's family
MIBCD_TASKS = {dataset: _copy(_MIBCD_TASKS) for dataset in DATASETS}  # MiB-CD's family
_FAMILY_TASKS = {MICRO: TASKS, MIBCD: MIBCD_TASKS}


def task_names(dataset):
    """Every task of the dataset, MiCro's family first."""
    _check_dataset(dataset)
    return list(TASKS[dataset]) + list(MIBCD_TASKS[dataset])


def all_tasks(dataset):
    """{task: (family, {step: [classes]})} of both families."""
    _check_dataset(dataset)
    return {task: (family, steps) for family, table in _FAMILY_TASKS.items()
            for task, steps in table[dataset].items()}


def _check_dataset(dataset):
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset '{dataset}'; choose one of: {', '.join(sorted(DATASETS))}")


def _task(dataset, task):
    _check_dataset(dataset)
    for table in _FAMILY_TASKS.values():
        if task in table[dataset]:
            return table[dataset][task]
    raise UserError(f"unknown task '{task}' for dataset '{dataset}'; "
                    f"choose one of: {', '.join(task_names(dataset))}")


def family(dataset, task):
    """'micro' (clutter is the background) or 'mibcd' (synthetic background channel 0)."""
    _task(dataset, task)
    return MIBCD if task in MIBCD_TASKS[dataset] else MICRO


def synthetic_background(dataset, task):
    return family(dataset, task) == MIBCD


def filter_modes(dataset, task):
    """{mode: split-folder suffix} of the task's family; the first mode is the default."""
    return dict(FILTER_MODES[family(dataset, task)])


def check_filter_mode(dataset, task, mode):
    """The filter mode to use (None -> the family's default); UserError for another family's or unknown mode."""
    modes = filter_modes(dataset, task)
    if mode is None:
        return next(iter(modes))
    if mode not in modes:
        fam = family(dataset, task)
        other = MICRO if fam == MIBCD else MIBCD
        known = mode in FILTER_MODES[other]
        what = (f"belongs to {'MiB-CD' if other == MIBCD else 'MiCro'}'s tasks "
                f"({', '.join(_FAMILY_TASKS[other][dataset])})" if known else "is unknown")
        raise UserError("{mode} {what}; task {task} ({family}'s family) takes {modes}", mode=f"filter mode {mode}",
                        what=what, task=task, family="MiB-CD" if fam == MIBCD else "MiCro", modes=" or ".join(modes))
    return mode


def split_suffix(dataset, task, mode):
    """Suffix of the split folder / run tag of a filter mode ('' for the family's default)."""
    return filter_modes(dataset, task)[check_filter_mode(dataset, task, mode)]


def _check_step(dataset, task, step):
    steps = _task(dataset, task)
    step_given = step
    try:
        step = operator.index(step)  # accept numpy integers, refuse floats and strings
    except TypeError:
        step = None
    if step not in steps:
        raise UserError(f"task '{task}' of '{dataset}' has no step {step_given!r}; "
                        f"valid steps: {', '.join(str(s) for s in sorted(steps))}")
    return steps, step


def num_steps(dataset, task):
    """Number of incremental steps of the task (1 for `offline`)."""
    return len(_task(dataset, task))


def get_task_dict(dataset, task, step):
    """{step: [ISPRS classes]} for steps 0..step."""
    steps, step = _check_step(dataset, task, step)
    return {s: list(steps[s]) for s in range(step + 1)}


def get_task_labels(dataset, task, step):
    """(ISPRS classes introduced at `step`, ISPRS classes of all previous steps in task order)."""
    steps, step = _check_step(dataset, task, step)
    previous = [c for s in range(step) for c in steps[s]]
    return list(steps[step]), previous


def get_per_task_classes(dataset, task, step):
    """Channels of each step 0..step (the classifier sizes); step 0 includes the synthetic background."""
    steps, step = _check_step(dataset, task, step)
    extra = 1 if synthetic_background(dataset, task) else 0
    return [len(steps[s]) + (extra if s == 0 else 0) for s in range(step + 1)]


def get_order(dataset, task):
    """All ISPRS classes of the task in step order (without the synthetic background)."""
    steps = _task(dataset, task)
    return [c for s in sorted(steps) for c in steps[s]]


def channel_of(dataset, task):
    """{ISPRS class: model channel} (MiCro: position in the order; MiB-CD: 1 + position)."""
    offset = 1 if synthetic_background(dataset, task) else 0
    return {cls: offset + index for index, cls in enumerate(get_order(dataset, task))}


def channel_to_class(dataset, task):
    """uint8[256] lookup: model channel -> ISPRS class index (for the palette and whole-tile outputs);
    MiB-CD's synthetic background channel and 255 map to 255."""
    lut = np.full(256, 255, dtype=np.uint8)
    for cls, channel in channel_of(dataset, task).items():
        lut[channel] = cls
    return lut


def channel_names(dataset, task):
    """Name of every model channel of the task (MiB-CD: 'background' first)."""
    names = [CLASS_NAMES[c] for c in get_order(dataset, task)]
    return ([SYNTHETIC_BACKGROUND_NAME] + names) if synthetic_background(dataset, task) else names
